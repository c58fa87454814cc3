"""m2m.stream: the DataLoader a lake exports.

Entry point: `m2m.stream.loader.make_loader(source, batch_size=..., warm_bytes=..., hot_bytes=...)`
returns a `StreamLoader` (a `torch.utils.data.DataLoader`). Orders are pure functions
(`shuffle`, `partition`, `order`, `topology`); the data path is a chain of stages
(`stages.batches` -> `stages.cold` / `stages.warm` -> `stages.hot` -> `stages.prefetch`).
"""
