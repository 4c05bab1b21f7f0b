"""Safe loading: Megatron's pickled args load without Megatron, and a pickle that would run code is refused unrun."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types

import pytest
import torch

from common import fixture_dir
from qwenlink.checkpoint.safe_load import MegatronStandIn, safe_torch_load
from qwenlink.errors import QwenlinkError


def test_fixture_args_load_with_stand_ins_and_without_megatron():
    """Run in a fresh interpreter so we can prove no `megatron` module was imported (or needed)."""
    path = fixture_dir("megatron-core-tiny-qwen2", "mcore-tp1-pp2", "iter_0000001", "mp_rank_00_001",
                       "model_optim_rng.pt")
    code = (
        "import sys\n"
        "from qwenlink.checkpoint.safe_load import safe_torch_load\n"
        f"ck = safe_torch_load({str(path)!r})\n"
        "a = ck['args']\n"
        "print(a.model_type.qualified_name, a.model_type.value, a.attention_backend.name, a.attention_backend.value)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))\n"
        "print(ck['model']['output_layer.weight'].shape[0], a.pipeline_model_parallel_size)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["megatron.core.enums.ModelType 1 AttnBackend 5", "[]", "384 2"]


class _Payload:
    """Pickles as a call to `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_checkpoint(path, payload) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "args": payload, "iteration": 1}, path)


@pytest.mark.parametrize("make,global_name", [
    (lambda m: _Payload(os.system, f"touch {m}"), "posix.system"),
    (lambda m: _Payload(exec, f"open({str(m)!r}, 'w').close()"), "exec"),
    (lambda m: _Payload(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
    (lambda m: _Payload(open, str(m), "w"), "io.open"),
])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, make, global_name):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_optim_rng.pt"
    _evil_checkpoint(evil, make(marker))
    with pytest.raises(QwenlinkError) as info:
        safe_torch_load(evil)
    message = str(info.value)
    assert str(evil) in message and global_name in message and "nothing from the file was executed" in message
    assert not marker.exists()


def test_plain_pickle_with_stack_global_is_refused(tmp_path):
    """Protocol 4 (STACK_GLOBAL) and a non-zip file take other code paths in torch; still refused."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=4))
    with pytest.raises(QwenlinkError, match="refused to load pickle"):
        safe_torch_load(evil)
    assert not marker.exists()


def test_unknown_megatron_enum_becomes_an_inert_stand_in(tmp_path, monkeypatch):
    """A Megatron name we have not listed is still never imported: it is bound to a stand-in."""
    module = types.ModuleType("megatron.core.future_enums")

    class Recipe:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return Recipe, (self.value,)

    Recipe.__module__, Recipe.__qualname__ = module.__name__, "Recipe"
    module.Recipe = Recipe
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "x.pt"
    torch.save({"args": {"recipe": Recipe(7)}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    loaded = safe_torch_load(path)["args"]["recipe"]
    assert isinstance(loaded, MegatronStandIn) and not isinstance(loaded, Recipe)
    assert loaded.qualified_name == "megatron.core.future_enums.Recipe" and loaded.value == 7
    with pytest.raises(TypeError):
        pickle.dumps(loaded)  # a stand-in is never written back into a file


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "model_optim_rng.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(QwenlinkError, match="model_optim_rng.pt: unreadable checkpoint file"):
        safe_torch_load(bad)
    with pytest.raises(QwenlinkError, match="nope.pt: file not found"):
        safe_torch_load(tmp_path / "nope.pt")
