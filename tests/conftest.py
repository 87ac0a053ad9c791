import os

import pytest

# Nothing may be downloaded at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def megatron():
    """Torch distributed (gloo, world size 1) + Megatron parallel state, once per session."""
    from distillscale.models.megatron_gpt import init_distributed

    init_distributed()
    return True
