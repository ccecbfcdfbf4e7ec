import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint, write_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_orthrus_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_orthrus")
    write_checkpoint(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_orthrus(tiny_orthrus_dir):
    import orthrus

    return orthrus.load(tiny_orthrus_dir, device="cpu")
