"""Make ``tests/data/tokenizer/chat/<variant>.json`` with the official tokenizers (transformers 4.37.2).

Run from the repository root in a virtual environment holding transformers 4.37.2 (outside the repository),
with the InternVL source tree for ``tokenization_internlm2.py`` (OpenGVLab/InternVL, internvl_chat)::

    PYTHONPATH=$PWD /path/to/venv/bin/python tests/data/tokenizer/chat/make_oracle.py /path/to/tokenization_internlm2.py

For every tiny checkpoint it records ``apply_chat_template`` (text, ids, a padded batch) on a few
conversations. It also checks, without recording anything, that transformers loads the folder written by our
``save_pretrained`` into the same tokenizer as the original folder (ids, decoding, special tokens, flags).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer as OfficialAutoTokenizer

from internvl_runtime.processing.tokenization import AutoTokenizer

VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
ROOT = Path(__file__).resolve().parents[4]
OUT = Path(__file__).resolve().parent

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": "A cat on a mat."},
        {"role": "user", "content": "And its colour?"},
    ],
    [{"role": "user", "content": "中文 and émoji 🙂  two  spaces \n\t<img></img> end "}],
    [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Quiet morning light"}],
]
ROUNDTRIP_TEXTS = ["", " ", "Hello world", "<img><IMG_CONTEXT></img>\nhi", "中文 🙂 don't", "  a\n\n b\t",
                   "<|im_start|>user\nhi<|im_end|>", "<s>x</s>", "▁lead ▁", "12345 3.14"]
FLAGS = ["padding_side", "model_max_length", "bos_token", "eos_token", "pad_token", "unk_token",
         "all_special_tokens", "all_special_ids", "vocab_size", "add_bos_token", "add_eos_token", "legacy",
         "clean_up_tokenization_spaces", "chat_template"]


def with_code(variant: str, code: Path, into: Path) -> Path:
    """A copy of the checkpoint's tokenizer files plus ``tokenization_internlm2.py`` (the remote code)."""
    folder = into / variant
    folder.mkdir()
    for path in (ROOT / "tests" / "fixtures" / "ckpt" / variant).iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, folder)
    shutil.copy(code, folder)
    return folder


def main(code: Path) -> None:
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            source = with_code(variant, code, Path(tmp))
            official = OfficialAutoTokenizer.from_pretrained(source, trust_remote_code=True, use_fast=False)
            cases = []
            for messages in CONVERSATIONS:
                for add_generation_prompt in (False, True):
                    text = official.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
                    ids = official.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
                    cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                                  "text": text, "ids": ids})
            # transformers 4.37 has no batched apply_chat_template; later versions render each conversation
            # and encode the texts together, as here.
            texts = [official.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in CONVERSATIONS[:2]]
            batch = official(texts, padding=True, add_special_tokens=False)
            record = {"cases": cases, "batch": {"conversations": CONVERSATIONS[:2], "padding_side":
                                                official.padding_side, "input_ids": batch["input_ids"],
                                                "attention_mask": batch["attention_mask"]}}
            (OUT / f"{variant}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")

            saved = Path(tmp) / "saved"
            AutoTokenizer.from_pretrained(source).save_pretrained(saved)
            reloaded = OfficialAutoTokenizer.from_pretrained(saved, trust_remote_code=True, use_fast=False)
            assert type(reloaded).__name__ == type(official).__name__, (variant, type(reloaded))
            for flag in FLAGS:
                assert getattr(reloaded, flag, None) == getattr(official, flag, None), (variant, flag)
            assert reloaded.added_tokens_decoder == official.added_tokens_decoder, variant
            for text in ROUNDTRIP_TEXTS:
                ids = official.encode(text)
                assert reloaded.encode(text) == ids, (variant, text)
                assert reloaded.decode(ids) == official.decode(ids), (variant, text)
                assert reloaded.decode(ids, skip_special_tokens=True) == official.decode(ids, skip_special_tokens=True)
            print(variant, "ok:", len(cases), "chat cases; transformers reloads our save_pretrained folder")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
