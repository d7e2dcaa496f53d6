"""Optional dependencies: a missing one is one exact line on stderr (exit 2) before any work."""

from __future__ import annotations

import os
import re
import sys

import pytest

from gamma import cli, extras
from gamma.errors import GammaError

try:
    import tomllib
except ImportError:                      # Python 3.10
    import tomli as tomllib              # type: ignore[no-redef]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_work(monkeypatch):
    """Fail loudly if a command gets as far as loading a model or verifying."""
    def boom(*a, **k):
        raise AssertionError("work started before the dependency check")
    import importlib
    A = importlib.import_module("gamma.commands.analyze")
    api = importlib.import_module("gamma.verify.api")
    monkeypatch.setattr(A, "load", boom)
    monkeypatch.setattr(A, "run_verification", boom)
    monkeypatch.setattr(api, "as_model", boom)


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_extra_is_in_pyproject_and_lists_its_module():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        optional = tomllib.load(f)["project"]["optional-dependencies"]
    for module, extra in extras.EXTRAS.items():
        assert extra in optional, extra
        assert module in optional[extra], (module, extra)


def test_require_message_and_unknown_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(GammaError) as e:
        extras.require("gamma analyze", "matplotlib")
    assert str(e.value) == "gamma analyze needs matplotlib: pip install gamma-bounds[report]"
    with pytest.raises(KeyError, match="numpy is not an optional dependency"):
        extras.require("x", "numpy")


def test_analyze_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _no_work(monkeypatch)
    code, out, err = _run(capsys, ["analyze", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r")])
    assert (code, out) == (2, "")
    assert err == "gamma: error: gamma analyze needs matplotlib: pip install gamma-bounds[report]\n"
    assert not (tmp_path / "r").exists()


def test_verify_ray_without_ray(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    _no_work(monkeypatch)
    code, out, err = _run(capsys, ["verify", str(tmp_path / "no-such-model"), "--block-wise", "--ray", "local"])
    assert (code, out) == (2, "")
    assert err == "gamma: error: gamma verify --ray needs ray: pip install gamma-bounds[ray]\n"


def test_regress_report_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = _run(capsys, ["regress", "report", "--history", str(tmp_path / "no-such-history.jsonl"),
                                   "--out", str(tmp_path / "r")])
    assert (code, out) == (2, "")
    assert err == "gamma: error: gamma regress report needs matplotlib: pip install gamma-bounds[report]\n"


@pytest.mark.parametrize("sub", ["run", "check"])
def test_regress_fixture_without_transformers(monkeypatch, capsys, tmp_path, sub):
    suite = tmp_path / "suite.toml"
    suite.write_text('[[case]]\nname = "a"\nmodel = "zoo:smollm2_135m"\nmethod = "ibp"\nepsilon = 1e-3\n'
                     'mode = "full"\n\n[[case]]\nname = "b"\nmodel = "fixture:tiny-qwen3"\nmethod = "ibp"\n'
                     'epsilon = 1e-3\nmode = "full"\n')
    monkeypatch.setitem(sys.modules, "transformers", None)
    import gamma.regress as R
    monkeypatch.setattr(R, "run_case", lambda *a, **k: pytest.fail("a case ran before the dependency check"))
    extra = ["--history", str(tmp_path / "h.jsonl")] if sub == "run" else ["--baseline", str(suite)]
    code, out, err = _run(capsys, ["regress", sub, str(suite), "--quiet"] + extra)
    assert (code, out) == (2, "")
    assert err == "gamma: error: fixture:tiny-qwen3 needs transformers: pip install gamma-bounds[fixtures]\n"
    assert not (tmp_path / "h.jsonl").exists()


def test_no_command_module_imports_an_extra_at_import_time():
    """The CLI must start (and print its one-line errors) without any optional package."""
    import subprocess
    code = ("import sys\n"
            "for m in ('matplotlib', 'ray', 'transformers'): sys.modules[m] = None\n"
            "from gamma import cli\n"
            "sys.exit(cli.main(['analyze', 'no-such-model']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr == "gamma: error: gamma analyze needs matplotlib: pip install gamma-bounds[report]\n"
