"""Backend discovery through the ``velesio.backends`` entry points (needs the project installed:
``pip install -e .``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from velesio.backends import API_VERSION
from velesio.plugins import discovery
from velesio.plugins.discovery import ALLOW_ENV, Discovered, allow_list, available, describe, discover

BUILT_IN = {"llama-cpp", "ctransformers", "diffusers", "benchmark"}


def _installed() -> bool:
    try:
        metadata.distribution("velesio")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(not _installed(), reason="velesio is not installed (pip install -e .)")


@pytest.fixture(autouse=True)
def _no_allow_list(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)


def make_dist(root, dist, entries: dict[str, str], modules: dict[str, str], version="0.1"):
    """A throwaway installed distribution: a ``*.dist-info`` folder plus its modules, under ``root``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[velesio.backends]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))
    return root


@pytest.fixture
def plugins_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    make_dist(site, "velesio-test-plugins", {
        "broken": "vt_broken:BrokenBackend",
        "not-a-backend": "vt_misc:NotABackend",
        "too-new": "vt_misc:TooNew",
        "api-1": "vt_misc:ApiOne",
        "misnamed": "vt_misc:Misnamed",
        "abstract": "vt_misc:Abstract",
        "good": "vt_misc:Good",
    }, {
        "vt_broken": "raise ImportError('needs libfoo, which is not installed')\n",
        "vt_misc": f"""
            from velesio.backends import Backend

            class NotABackend:
                pass

            class TooNew(Backend):
                name, kind, operations = "too-new", "text", ("completion",)
                api_version = {API_VERSION + 1}
                def load(self): return {{}}
                def run(self, job, ctx): return {{}}

            class ApiOne(Backend):  # written for API 1: dict params in, a dict out
                name, kind, operations = "api-1", "text", ("completion",)
                api_version = 1
                def load(self): return {{}}
                def run(self, job, ctx): return {{"text": job.params.get("prompt", "")}}

            class Misnamed(Backend):
                name, kind, operations = "something-else", "text", ("completion",)
                def load(self): return {{}}
                def run(self, job, ctx): return {{}}

            class Abstract(Backend):
                name, kind, operations = "abstract", "text", ("completion",)

            class Good(Backend):
                name, kind, operations = "good", "text", ("completion", "chat")
                @classmethod
                def unavailable_reason(cls): return "needs a frobnicator (pip install frob)"
                def load(self): return {{}}
                def run(self, job, ctx): return {{}}
        """,
    })
    monkeypatch.syspath_prepend(str(site))
    return site


def by_name(found: list[Discovered]) -> dict[str, Discovered]:
    return {d.name: d for d in found}


@needs_install
def test_finds_built_in_backends_through_installed_entry_points():
    found = by_name(discover())
    assert BUILT_IN <= set(found)
    ct = found["ctransformers"]
    assert ct.value == "velesio.backends.ctransformers:CTransformersBackend"
    assert ct.dist == "velesio" and ct.version == metadata.version("velesio")
    assert ct.ok and ct.backend.name == "ctransformers" and ct.backend.kind == "text"
    assert "ctransformers" in available()
    for d in found.values():  # every entry is either a class or an explained error, never an exception
        assert d.ok or (d.error and d.name in d.error and "fix:" in d.error)


@needs_install
def test_discovery_imports_no_heavy_library():
    code = ("import sys, json; from velesio.plugins.discovery import discover; discover(); "
            "print(json.dumps([m for m in ('torch', 'llama_cpp', 'ctransformers', 'diffusers', 'numpy') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_broken_plugins_become_error_entries(plugins_site):
    found = by_name(discover())  # must not raise
    broken = found["broken"]
    assert broken.backend is None and broken.dist == "velesio-test-plugins" and broken.version == "0.1"
    assert "backend plugin 'broken'" in broken.error and "ImportError" in broken.error
    assert "needs libfoo" in broken.error and "pip install -U velesio-test-plugins" in broken.error
    assert "needs libfoo" in broken.reason and "fix" not in broken.reason
    assert broken.fix.startswith("reinstall or upgrade it") and ALLOW_ENV in broken.fix
    for d in found.values():
        assert d.ok or (d.reason and d.fix)
    assert "Backend subclass" in found["not-a-backend"].error
    too_new = found["too-new"].error
    assert f"API {API_VERSION + 1}" in too_new and "upgrade velesio" in too_new
    api_one = found["api-1"].error  # API 2 made params and results typed: a plugin of API 1 is not run
    assert API_VERSION == 2 and "backend API 1" in api_one and "pip install -U velesio-test-plugins" in api_one
    assert "registered as 'misnamed'" in found["misnamed"].error
    assert "does not implement load, run" in found["abstract"].error
    good = found["good"]
    assert good.ok and good.error is None and good.backend.__name__ == "Good"
    assert "good" in available(list(found.values()))
    assert "broken" not in available(list(found.values()))


def test_describe_lines(plugins_site):
    lines = describe()
    line = {ln.split()[0]: ln for ln in lines}
    assert "velesio-test-plugins 0.1" in line["good"]
    assert line["good"].rstrip().endswith("unavailable: needs a frobnicator (pip install frob)")
    assert "error: backend plugin 'broken'" in line["broken"]
    if _installed():
        assert "velesio" in line["ctransformers"]
        assert line["ctransformers"].split()[-1] == "ok" or "unavailable:" in line["ctransformers"]


def test_allow_list(plugins_site, monkeypatch):
    assert allow_list("") is None and allow_list(" a, b ,,") == {"a", "b"}
    monkeypatch.setenv(ALLOW_ENV, "good, broken")
    found = by_name(discover())
    assert set(found) == {"good", "broken"}
    monkeypatch.setenv(ALLOW_ENV, "good,no-such-backend")
    found = by_name(discover())
    assert set(found) == {"good", "no-such-backend"}
    assert ALLOW_ENV in found["no-such-backend"].error and found["no-such-backend"].backend is None
    # an explicit allow argument overrides the environment
    assert set(by_name(discover(allow={"broken"}))) == {"broken"}
    assert {"good", "broken"} <= set(by_name(discover(allow=None)))


def test_skipped_plugins_are_not_imported(plugins_site, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "good")
    sys.modules.pop("vt_broken", None)
    discover()
    assert "vt_broken" not in sys.modules


def test_duplicate_names(tmp_path, monkeypatch):
    a = make_dist(tmp_path / "a", "velesio-dup-a", {"dup": "vt_dup_a:Dup"}, {"vt_dup_a": """
        from velesio.backends import Backend
        class Dup(Backend):
            name, kind, operations = "dup", "text", ("chat",)
            def load(self): return {}
            def run(self, job, ctx): return {}
    """})
    b = make_dist(tmp_path / "b", "velesio-dup-b", {"dup": "vt_dup_b:Dup"}, {"vt_dup_b": ""})
    monkeypatch.syspath_prepend(str(b))
    monkeypatch.syspath_prepend(str(a))
    found = [d for d in discover(allow={"dup"}) if d.name == "dup"]
    assert len(found) == 2
    assert found[0].ok and "already taken" in found[1].error


def test_group_name():
    assert discovery.ENTRY_POINT_GROUP == "velesio.backends"


def test_example_echo_plugin_is_discovered_and_serves_echo_1(tmp_path, monkeypatch):
    """plugins/example-echo as if pip-installed: its dist-info on sys.path, its module from the source tree."""
    import os

    from velesio.backends import Cancelled, JobContext, TextParams, TextResult
    from velesio.mesh.jobs import Job

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "example-echo")
    make_dist(tmp_path / "site", "velesio-example-echo", {"example-echo": "velesio_example_echo:EchoBackend"}, {},
              version="0.1.0")
    monkeypatch.syspath_prepend(src)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (found,) = discover(allow={"example-echo"})
    assert found.ok and found.dist == "velesio-example-echo"
    cls = found.backend
    (model,) = cls.embedded_models()
    assert (model.name, model.backend) == ("echo-1", "example-echo")
    backend = cls(model)
    assert backend.load()["n_ctx"] > 0

    chunks = []
    job = Job(op="chat", model="echo-1", params=TextParams(
        messages=[{"role": "user", "content": "one two three four"}], max_tokens=3))
    result = backend.run(job, JobContext(job, chunks.append))
    assert isinstance(result, TextResult)
    assert result.text == "four three two" == "".join(c["text"] for c in chunks)
    assert result.finish_reason == "length" and result.completion_tokens == 3
    job = Job(op="completion", model="echo-1", params=TextParams(prompt="a b c", max_tokens=-1))
    assert backend.run(job, JobContext(job, lambda c: None)).text == "c b a"

    job = Job(op="completion", model="echo-1", params=TextParams(prompt="a b c d", max_tokens=-1))
    ctx = JobContext(job, lambda c: ctx.cancel())
    with pytest.raises(Cancelled):
        backend.run(job, ctx)
