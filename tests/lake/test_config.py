import pytest

from m2m import ConfigError, DeviceUnavailableError, M2MConfig, create_m2m


@pytest.mark.parametrize("field,value", [
    ("latent_dim", 0), ("latent_dim", 3.5), ("storage_dtype", "int8"), ("device", "gpu"), ("knn_k", 0),
    ("langevin_steps", -1), ("langevin_dt", 0.0), ("langevin_T", float("nan")), ("soc_threshold", 1.5),
    ("seed", -1), ("warm_bytes", -5), ("shard_bytes", 10), ("prefetch", -1), ("langevin_dt", 1.5), ("consolidate_similarity", 0.0),
])
def test_config_rejects_bad_field_naming_it(field, value):
    with pytest.raises(ValueError, match=field) as info:
        M2MConfig(**{field: value})
    assert isinstance(info.value, ConfigError)


def test_cuda_without_cuda_is_a_clear_error_at_create(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        create_m2m(M2MConfig(device="cuda"))
