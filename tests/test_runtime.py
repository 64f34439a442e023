"""vlmjax.runtime: the CLIs' one-time re-exec with glibc huge-page tunables."""

import os
import subprocess
import sys

import pytest

from vlmjax import runtime

CODE = "import os; from vlmjax.runtime import tune_process; tune_process(); print(os.environ.get('GLIBC_TUNABLES'))"


def _run(env_over):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLMJAX_NO_REEXEC")}
    env.update(env_over)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not (sys.platform == "linux" and runtime._glibc_ok()), reason="needs Linux with glibc >= 2.35")
def test_reexec_sets_tunables_once_and_respects_opt_outs():
    assert _run({}) == runtime.TUNABLES  # re-exec'd once (a second exec would loop: GLIBC_TUNABLES is now set)
    assert _run({"VLMJAX_NO_REEXEC": "1"}) == "None"
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == "glibc.malloc.arena_max=2"  # the user's own


def test_not_wanted_without_glibc(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("VLMJAX_NO_REEXEC", raising=False)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert not runtime.wanted()
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not runtime.wanted()
