"""Chat-ready HF exports (issue 20, deliverable 2): a model trained with ChatML is exported with Qwen1.5-Chat's end
ids, so transformers' `generate` with the directory's own generation config stops at <|im_end|>; base models as
Qwen1.5 base ships them; the exported tokenizer's chat template renders qwenlink's ChatML. Every writer is covered:
save_hf_model, the trainer's export_hf / export_adapter, `convert --to hf` of its checkpoint and `--merge-lora`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from qwenlink.checkpoint.convert import ConvertOptions, convert
from qwenlink.checkpoint.hf import save_hf_model
from qwenlink.data.handlers import HandlerOptions
from qwenlink.data.preprocess import PreprocessConfig, preprocess
from qwenlink.data.templates import ChatMLTemplate, Turn
from qwenlink.errors import QwenlinkError
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.tokenizer import IM_END, Tokenizer

CHAT_EOS = [151645, 151643]
BASE_GENERATION = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]


def _gen(directory: Path) -> dict:
    return json.loads((directory / "generation_config.json").read_text())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@torch.no_grad()
def _end_of_turn_model():
    """A real-vocabulary model whose every next token is <|im_end|>: every position's residual stream is the same
    embedding (attention and MLP outputs zeroed), and only the head row of <|im_end|> is nonzero."""
    config = get_preset("qwen-tiny")
    config.tie_word_embeddings, config.hidden_size, config.intermediate_size, config.num_hidden_layers = False, 32, 64, 1
    model = build_model(config, seed=0)
    model.embed_tokens.weight.fill_(1.0)
    for layer in model.layers.values():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.lm_head.weight.zero_()
    model.lm_head.weight[151645] = 1.0
    return model


def test_generate_with_the_exports_own_config_stops_at_im_end_and_the_template_is_chatml(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _end_of_turn_model()
    chat = save_hf_model(model, tmp_path / "chat", tokenizer=tok, chat=True)
    base = save_hf_model(model, tmp_path / "base", tokenizer=tok)
    assert _gen(chat)["eos_token_id"] == CHAT_EOS and _gen(base) == BASE_GENERATION
    new_tokens = {}
    for directory in (chat, base):
        hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
        # Chat and base exports both carry Qwen1.5's template, which renders what qwenlink trains and prompts with.
        assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(MESSAGES)
        trained = "".join(s.text for s in ChatMLTemplate().render([Turn(m["role"], m["content"]) for m in MESSAGES]))
        assert hf_tok.apply_chat_template(MESSAGES, tokenize=False) == trained
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = hf_model.generate(**prompt, max_new_tokens=5)  # the directory's own generation_config.json
        new_tokens[directory.name] = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new_tokens["chat"] == [151645]  # stopped at the end of the turn
    assert new_tokens["base"] == [151645] * 5  # a base config runs on to the limit
    assert transformers.AutoTokenizer.from_pretrained(chat).eos_token == IM_END


def test_a_chat_export_without_a_tokenizer_is_one_line(tmp_path):
    with pytest.raises(QwenlinkError, match="needs the tokenizer"):
        save_hf_model(build_model(get_preset("test-tiny"), seed=0), tmp_path / "m", chat=True)
    assert not (tmp_path / "m").exists()


# ---- the trainer and convert ------------------------------------------------------------------------------------
def _sft_data(root: Path, template: str) -> str:
    records = [{"messages": [{"role": "user", "content": f"add {i} and {i}"},
                             {"role": "assistant", "content": str(2 * i)}]} for i in range(8)]
    prefix, source = root / template, root / f"{template}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    preprocess(PreprocessConfig(input=str(source), output_prefix=str(prefix),
                                options=HandlerOptions(handler="chat", template=template)))
    return str(prefix)


def _train(root: Path, data: str, *extra: str):
    from qwenlink.train.config import load_config
    from qwenlink.train.trainer import Trainer

    cfg = load_config(None, ["--job.mode=sft", "--model.preset=qwen-tiny", "--model.arch.num_hidden_layers=1",
                             f"--data.path={data}", "--data.seq_length=64", "--train.micro_batch_size=2",
                             "--train.global_batch_size=2", "--train.train_iters=1", "--train.device=cpu",
                             f"--job.output_dir={root}", "--checkpoint.interval=1", "--metrics.tensorboard=false",
                             "--metrics.progress=lines", *extra])
    trainer = Trainer(cfg, stream=io.StringIO())
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An sft run on ChatML data with LoRA (adapter and merged exports) and one on alpaca-formatted data."""
    root = tmp_path_factory.mktemp("runs")
    config = get_preset("qwen-tiny")
    config.num_hidden_layers = 1
    base = save_hf_model(build_model(config, seed=1), root / "base", tokenizer=Tokenizer.default())
    lora = ["--lora.enabled=true", "--lora.r=2", f"--model.init_from={base}",
            f"--lora.export_adapter={root / 'adapter'}"]
    _train(root / "chatml", _sft_data(root, "chatml"), f"--checkpoint.export_hf={root / 'chatml-hf'}", *lora)
    _train(root / "alpaca", _sft_data(root, "alpaca"), f"--checkpoint.export_hf={root / 'alpaca-hf'}")
    return {"root": root, "base": base}


def test_the_trainer_exports_a_chatml_run_as_chat_and_other_runs_as_base(runs):
    root = runs["root"]
    assert _gen(root / "chatml-hf")["eos_token_id"] == CHAT_EOS
    assert json.loads((root / "chatml-hf" / "tokenizer_config.json").read_text())["eos_token"] == IM_END
    assert _gen(root / "alpaca-hf") == BASE_GENERATION
    assert "chat_template" in json.loads((root / "alpaca-hf" / "tokenizer_config.json").read_text())
    assert _gen(root / "adapter")["eos_token_id"] == CHAT_EOS  # for a later --merge-lora


def test_convert_of_a_run_and_merge_lora_keep_the_kind(runs, tmp_path):
    root = runs["root"]
    merged = convert(runs["base"], tmp_path / "merged", ConvertOptions(to="hf", merge_lora=str(root / "adapter")))
    assert _gen(merged)["eos_token_id"] == CHAT_EOS
    from_run = convert(root / "alpaca" / "checkpoints", tmp_path / "alpaca", ConvertOptions(to="hf"))
    assert _gen(from_run) == BASE_GENERATION and (from_run / "tokenizer.json").is_file()
    forced = convert(root / "alpaca" / "checkpoints", tmp_path / "forced", ConvertOptions(to="hf", chat="yes"))
    assert _gen(forced)["eos_token_id"] == CHAT_EOS
    # An HF input keeps its own generation config, through Megatron and back (--config-from).
    megatron = convert(root / "chatml-hf", tmp_path / "mcore", ConvertOptions(to="megatron"))
    back = convert(megatron, tmp_path / "back", ConvertOptions(to="hf", config_from=str(root / "chatml-hf")))
    assert _gen(back) == _gen(root / "chatml-hf")
    assert convert(runs["base"], tmp_path / "plain", ConvertOptions(to="hf")) and _gen(tmp_path / "plain") == \
        BASE_GENERATION
