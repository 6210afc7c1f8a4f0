import os

# Triton kernels run on the CPU through the interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Test tiers (markers registered in pyproject.toml). `make test-fast` runs `unit` (about a minute on 2 cores);
# `make test` (CI, the README's command) runs all three.
KERNEL_TESTS = {"test_modulate", "test_st_attention", "test_gated_cross_attn", "test_csrc", "test_dispatch",
                "test_stdit_fused", "test_sm90_compile"}
INTEGRATION_TESTS = {"test_demo", "test_train", "test_fsdp", "test_gpu_suite_dry", "test_memorise", "test_package",
                     "test_cli_surface", "test_cache", "test_video_recaption", "test_semantic", "test_faults",
                     "test_security", "test_recaption", "test_evaluate", "test_data", "test_vae_video",
                     "test_golden_loss", "test_pipeline", "test_validation", "test_wandb", "test_decode_rgb", "test_study",
                     "test_workbench"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.stem
        tier = "kernels" if module in KERNEL_TESTS else "integration" if module in INTEGRATION_TESTS else "unit"
        item.add_marker(getattr(pytest.mark, tier))
