import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A factory: tiny_dir('bert' | 'llama' | 'gpt2') -> path of a saved tiny random model folder."""
    root = tmp_path_factory.mktemp("models")
    return lambda kind="bert", seed=0: tiny.make_model_dir(root, kind, seed)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    return tiny.write_csv(path, tiny.toy_sentiment_rows(240))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with tiny.torch_threads(1):
        yield
