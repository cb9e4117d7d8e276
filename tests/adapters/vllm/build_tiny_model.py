"""Build a tiny random-weight Llama with a locally trained tokenizer, offline.

The result loads in vLLM and transformers and is meant for tests only: its text is
nonsense, but it is reproducible (fixed seeds), small (about 1 MB) and quick to build
(a few seconds). Re-running with the same --out is a no-op once the model is there.

Shape: hidden 128, 4 heads of size 32 (vLLM's CPU attention needs head size >= 32),
2 layers, intermediate 256, byte-level BPE vocabulary of 512.

EOS: the output-embedding rows of the special tokens and of the tokens that do not
decode to printable ASCII are zeroed, so their logit is always 0 while the maximum
logit over the rest is practically always above 0. Greedy decoding therefore never
stops on EOS and never emits partial UTF-8: `max_tokens` (or a `stop` string) bounds
every greedy output, and each generated token adds visible text.

Usage: python build_tiny_model.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 512
SEED = 0
MAX_POSITIONS = 2048
# Files whose presence means "already built"; the weights are written last.
REQUIRED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORDS = (
    "the a model node proxy request token stream answer network gateway engine "
    "cache batch prompt reply user system assistant hello world quick brown fox "
    "jumps over lazy dog red green blue one two three four five six seven eight "
    "nine ten and or not is are was were be to of in on at for with by from"
).split()


def _corpus(rng: random.Random, lines: int = 4000) -> list[str]:
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        sentence = " ".join(words).capitalize() + rng.choice(".!?,;:")
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        if rng.random() < 0.2:
            sentence = f"<|{rng.choice(['user', 'assistant', 'system'])}|>\n{sentence}"
        out.append(sentence)
    return out


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Keep offsets byte-level consistent; BOS is added by the chat template and by
    # completions (add_special_tokens=True) through this post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, 0)],
    )
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(SEED)), trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    tok.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,  # the post-processor adds it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _suppressed_ids(out: Path) -> list[int]:
    """Token ids that must never win greedy decoding: specials and non-ASCII bytes."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = []
    for token_id in range(tok.get_vocab_size()):
        text = tok.decode([token_id], skip_special_tokens=False)
        if (
            text in (BOS, EOS, PAD)
            or not text
            or not all(32 <= ord(c) < 127 or c == "\n" for c in text)
        ):
            ids.append(token_id)
    return ids


def _build_model(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # Larger output weights spread the logits so greedy picks are clear-cut
        # (no near ties that float noise could flip between runs or batch sizes).
        model.lm_head.weight.normal_(0.0, 0.2)
        model.lm_head.weight[_suppressed_ids(out)] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(out, safe_serialization=True)


def build(out: Path) -> bool:
    """Build the model into `out`; return False when it was already there."""
    if all((out / name).is_file() for name in REQUIRED):
        return False
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists, is not empty and holds no complete model")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent builder never
    # leaves a half-written model that a later run would take as complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build_tokenizer(tmp)
        _build_model(tmp)
        missing = [name for name in REQUIRED if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"build produced no {', '.join(missing)}")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            out.rmdir()  # empty, checked above
        try:
            os.rename(tmp, out)
        except OSError:
            if not all((out / name).is_file() for name in REQUIRED):
                raise
            return False  # another builder won the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    built = build(args.out)
    print(f"{'built' if built else 'already built'}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
