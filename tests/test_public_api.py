"""The public surface: names, laziness, sorted __all__."""

import subprocess
import sys

import m2m


def test_all_is_sorted_and_complete():
    assert sorted(m2m.__all__) == m2m.__all__
    for name in m2m.__all__:
        assert getattr(m2m, name) is not None


def test_import_is_cheap():
    code = "import sys, m2m; print(any(m in sys.modules for m in ('faiss', 'scipy', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert out.stderr == ""


def test_seed_api_names_exist():
    from m2m import M2MConfig, create_m2m, langevin, open_lake, vmf  # noqa: F401

    assert callable(create_m2m) and callable(open_lake)
    assert callable(vmf.sample) and callable(langevin.sample)


def test_m2m_data_lake_is_the_dataset_behind_the_loader():
    import torch

    from m2m import M2MConfig, M2MDataLake, create_m2m

    # a map-free Dataset, not an IterableDataset: Lightning warns about any sized loader over one
    assert issubclass(M2MDataLake, torch.utils.data.Dataset)
    with create_m2m(M2MConfig(latent_dim=8)) as lake:
        lake.add_splats(torch.randn(100, 8))
        dl = lake.export_to_dataloader(batch_size=10)
        assert isinstance(dl.dataset, M2MDataLake) and len(dl.dataset) == 100
        assert dl.batch_size == 10
        alone = list(dl.dataset)  # iterated alone: one epoch of the loader's batches
        assert [len(b) for b in alone] == [10] * 10
        assert torch.equal(torch.cat(alone), torch.cat(list(dl)))
