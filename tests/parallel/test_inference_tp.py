"""Tensor-parallel generation under torchrun: every rank holds a shard, rank 0 prints exactly what one process does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common import default_sigint


def test_tp2_generate_equals_single_process(tiny_fixture_hf):
    args = ["generate", "--model", str(tiny_fixture_hf), "--prompt", "hello world", "--prompt", "The capital of",
            "--max-new-tokens", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for sampling in (["--greedy"], ["--temperature", "0.9", "--top-p", "0.95", "--seed", "3"]):
        single = subprocess.run([sys.executable, "-m", "qwenlink.cli", *args, *sampling], capture_output=True,
                                text=True, env=env, timeout=120)
        assert single.returncode == 0, single.stderr
        tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "qwenlink.cli", *args, *sampling], capture_output=True, text=True, env=env,
                            timeout=180)
        assert tp.returncode == 0, tp.stderr[-3000:]
        assert tp.stdout == single.stdout


def test_tp2_eval_equals_single_process(tiny_fixture_hf, tmp_path):
    """MMLU scoring with the model sharded over two processes gives the same log-likelihoods and predictions."""
    import json

    from common import fixture_dir

    data = fixture_dir("mmlu", "data")
    args = ["eval", "--model", str(tiny_fixture_hf), "--data", str(data), "--subjects", "anatomy,virology",
            "--limit", "4", "--shots", "2", "--log-samples"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    single = subprocess.run([sys.executable, "-m", "qwenlink.cli", *args, "--output", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert single.returncode == 0, single.stderr
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m", "qwenlink.cli", *args, "--output", str(tmp_path / "tp.json")], capture_output=True,
                        text=True, env=env, timeout=180)
    assert tp.returncode == 0, tp.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "tp.json"))
    assert len(one["samples"]) == len(two["samples"]) == 8
    for a, b in zip(one["samples"], two["samples"]):
        assert a["prediction"] == b["prediction"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "qwenlink.cli",
            *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_tp2_chat_equals_single_process(tiny_fixture_hf):
    """Rank 0 reads the conversation and shares each line; the sharded ranks reply exactly as one process does."""
    args = ["chat", "--model", str(tiny_fixture_hf), "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "5"]
    conversation = "hello there\nwhat is two plus two?\n/clear\n/system be brief\nagain\n/quit\nnever read\n"
    single = subprocess.run([sys.executable, "-m", "qwenlink.cli", *args], input=conversation, capture_output=True,
                            text=True, env=ENV, timeout=120)
    assert single.returncode == 0, single.stderr
    tp = subprocess.run(_torchrun(*args), input=conversation, capture_output=True, text=True, env=ENV, timeout=180)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout == single.stdout and single.stdout.count("assistant> ") == 3


class _Server:
    """A `qwenlink serve --port 0` subprocess; the port is read from its start-up line on stderr."""

    def __init__(self, command: list[str]) -> None:
        import re
        import threading

        # Ctrl-C is what this test sends: the servers start with SIGINT's default disposition (common.default_sigint).
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONFAULTHANDLER": "1"},
                                        start_new_session=True, preexec_fn=default_sigint)
        self.log: list[str] = []
        self.base: str | None = None
        started = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                found = re.search(r"on (http://[\d.]+:\d+)/v1", line)
                if found:
                    self.base = found.group(1)
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        started.wait(timeout=150)
        assert self.base is not None, "server did not start:\n" + "".join(self.log)[-3000:]

    def stop(self) -> int:
        import signal
        import time

        os.killpg(self.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process gets it
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # PYTHONFAULTHANDLER (set in _Server's environment) makes SIGABRT print every thread's stack first.
            self.process.send_signal(signal.SIGABRT)
            time.sleep(3)
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError("server did not stop on Ctrl-C:\n" + "".join(self.log)[-6000:]) from None


def test_tp2_server_equals_single_process(tiny_fixture_hf):
    """Requests arrive on rank 0 only; the other rank follows its admissions and steps, and the replies (greedy,
    seeded sampling, streaming, concurrent requests of different lengths) equal a one-process server's."""
    import concurrent.futures

    import pytest

    openai = pytest.importorskip("openai")
    serve = ["serve", "--model", str(tiny_fixture_hf), "--port", "0", "--max-batch", "4"]
    servers = {"single": _Server([sys.executable, "-m", "qwenlink.cli", *serve]), "tp": _Server(_torchrun(*serve))}
    try:
        replies = {}
        for name, server in servers.items():
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
            out = [client.completions.create(model="hf", prompt="The capital of", max_tokens=12,
                                             temperature=0).choices[0].text,
                   client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=10, temperature=0.9, seed=4).choices[0].message.content,
                   "".join(c.choices[0].text for c in client.completions.create(
                       model="hf", prompt="Once upon", max_tokens=9, temperature=0.7, seed=1, stream=True))]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                out += list(pool.map(lambda i: client.completions.create(
                    model="hf", prompt="x " * (i + 1), max_tokens=5 + 3 * i, temperature=1.0,
                    seed=i).choices[0].text, range(3)))
            unseeded = client.completions.create(model="hf", prompt="free", max_tokens=6, temperature=1.0)
            assert unseeded.usage.completion_tokens >= 1
            # The ranks are still in step after an unseeded request (its seed is drawn on rank 0 and shared).
            out.append(client.completions.create(model="hf", prompt="Afterwards", max_tokens=8,
                                                  temperature=0).choices[0].text)
            replies[name] = out
        assert replies["tp"] == replies["single"]
        assert all(replies["single"])
    finally:
        codes, stuck = {}, []
        for name, server in servers.items():  # stop both, even when one hangs
            try:
                codes[name] = server.stop()
            except AssertionError as exc:
                stuck.append(f"{name}: {exc}")
        assert not stuck, "\n".join(stuck)
    log = "".join(servers["tp"].log)
    # Ctrl-C: rank 0 stops and announces it, the follower ignores the signal and leaves after it; no rank errors.
    assert codes["single"] == 0 and "Exception in thread" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.parametrize("fmt", ["hf", "qwenlink"])
def test_tp2_ranks_read_only_their_shards_of_a_checkpoint(tmp_path, fmt):
    """Each rank's anonymous memory grows by about half the checkpoint while loading at tp2 (the model is sharded on
    the meta device and the files are read slice by slice), not by the whole model as a load-then-shard would; a
    qwenlink (DCP) checkpoint gives each rank the same shards as the HF directory it was converted from."""
    import textwrap

    from qwenlink.checkpoint.convert import ConvertOptions, convert

    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.config import ModelConfig
    from qwenlink.models.qwen2 import build_model

    config = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    save_hf_model(build_model(config, seed=0), tmp_path / "m")
    small = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    save_hf_model(build_model(small, seed=0), tmp_path / "warmup")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    target = tmp_path / "m"
    if fmt == "qwenlink":
        target = convert(tmp_path / "m", tmp_path / "ckpt", ConvertOptions(to="qwenlink"), notice=lambda _: None)
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import threading, time
        import torch
        from qwenlink.inference.session import load_for_inference

        def anon():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024

        cpu = torch.device('cpu')
        load_for_inference({str(tmp_path / 'warmup')!r}, device=cpu, dtype=None)  # first-use allocations
        base = anon(); peak = [base]; done = [False]
        def watch():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        loaded, rank, world = load_for_inference({str(target)!r}, device=cpu, dtype=None)
        done[0] = True; t.join()
        peak[0] = max(peak[0], anon())
        local = sum((p.to_local() if hasattr(p, 'to_local') else p).nbytes for p in loaded.model.parameters())
        twin = load_for_inference({str(tmp_path / 'm')!r}, device=cpu, dtype=None)[0].model.state_dict()
        same = all(torch.equal(p.to_local() if hasattr(p, 'to_local') else p,
                               twin[n].to_local() if hasattr(twin[n], 'to_local') else twin[n])
                   for n, p in loaded.model.state_dict().items())
        # one file per rank: the ranks share torchrun's stdout, where their lines can interleave
        with open({str(tmp_path)!r} + f"/rank{{rank}}.txt", "w") as out:
            out.write(f"rank {{rank}}/{{world}} growth {{peak[0] - base}} local {{local}} same {{same}}")
    """))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, env=ENV, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in range(2)]
    assert [line[1] for line in lines] == ["0/2", "1/2"], run.stdout + run.stderr[-3000:]
    for line in lines:
        growth, local = int(line[3]), int(line[5])
        assert line[7] == "True", f"rank {line[1]}: its shards differ from those read from the HF directory"
        assert local < 0.55 * size  # each rank holds half the weights (norms are replicated)
        assert growth < 0.75 * size, f"rank {line[1]}: loading a {size / 1e6:.0f} MB checkpoint grew anonymous " \
                                     f"memory by {growth / 1e6:.0f} MB"
