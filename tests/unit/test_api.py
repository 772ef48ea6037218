"""The official user-facing API on the tiny-1B fixture: ``AutoModel.from_pretrained`` keywords,
``chat`` / ``batch_chat`` / ``generate`` behaviour and errors, streaming, and the package's public names."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch

import internvl_runtime
from internvl_runtime import (
    AutoModel,
    AutoTokenizer,
    ConfigError,
    ContextLengthExceeded,
    InvalidGenerationConfig,
    InvalidRequest,
    PlaceholderMismatch,
    TextIteratorStreamer,
    UnsupportedFeature,
)
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import PreparedRequest
from internvl_runtime.testing.checkpoints import write_checkpoint
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"
SIZE = 448  # tiny-1B tiles (force_image_size)


@pytest.fixture(scope="module")
def model():
    return AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32, low_cpu_mem_usage=True,
                                     use_flash_attn=True, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CKPT, trust_remote_code=True, use_fast=False)


def tiles(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_ids(model, tokenizer, question: str = "Hello, who are you?") -> dict:
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    _, query = model.build_chat_query(None, question)
    return tokenizer(query, return_tensors="pt")


def stop_id(model, tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(model.conv_template.sep)


# --------------------------------------------------------------------------------------------------
# from_pretrained keywords
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("torch_dtype", "expected"), [
    (None, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), ("float32", torch.float32), ("bfloat16", torch.bfloat16),
    ("torch.bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32),
])
def test_torch_dtype(torch_dtype, expected: torch.dtype) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch_dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_torch_dtype_auto_follows_config(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "bf16", "1B", dtype=torch.bfloat16)
    model = AutoModel.from_pretrained(folder, torch_dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("torch_dtype", ["int8", "float64", torch.float64, 3])
def test_torch_dtype_invalid(torch_dtype) -> None:
    with pytest.raises(InvalidRequest):
        AutoModel.from_pretrained(CKPT, torch_dtype=torch_dtype)


@pytest.mark.parametrize("kwargs", [
    dict(low_cpu_mem_usage=True), dict(low_cpu_mem_usage=False), dict(use_flash_attn=True),
    dict(use_flash_attn=False), dict(trust_remote_code=True), dict(trust_remote_code=False),
    dict(device_map=None), dict(device_map="cpu"), dict(device_map={"": "cpu"}),
    dict(torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, use_flash_attn=True, trust_remote_code=True,
         device_map="cpu"),
])
def test_official_keywords_accepted(kwargs: dict) -> None:
    model = AutoModel.from_pretrained(CKPT, **kwargs).eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert isinstance(model, internvl_runtime.InternVLChatModel)


def test_from_pretrained_accepts_str_path() -> None:
    assert AutoModel.from_pretrained(str(CKPT)).config.template == "Hermes-2"


@pytest.mark.parametrize("name", ["foo_bar", "attn_implementations"])  # attn_implementation: test_hf_model.py
def test_unknown_keyword(name: str) -> None:
    with pytest.raises(TypeError, match=name):
        AutoModel.from_pretrained(CKPT, **{name: 1})


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_quantized_loading(flag: str) -> None:  # details in tests/unit/test_quantization.py
    model = AutoModel.from_pretrained(CKPT, **{flag: True})
    assert model.quantization.bits == (8 if flag == "load_in_8bit" else 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", 0, {"": "cuda"}])
def test_cuda_device_map_without_cuda(device_map) -> None:
    with pytest.raises(InvalidRequest, match="CUDA"):
        AutoModel.from_pretrained(CKPT, device_map=device_map)


def test_multi_device_map_unsupported() -> None:
    with pytest.raises(UnsupportedFeature):
        AutoModel.from_pretrained(CKPT, device_map={"vision_model": "cpu", "language_model": "meta"})


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        AutoModel.from_pretrained(tmp_path / "InternVL2-1B")


# --------------------------------------------------------------------------------------------------
# The model object
# --------------------------------------------------------------------------------------------------

def test_eval_and_conv_template(model) -> None:
    assert model.eval() is model and not model.training
    assert model.conv_template.sep == "<|im_end|>"
    assert model.num_image_token == 256


def test_to_bfloat16_then_chat(tokenizer) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32).eval()
    assert isinstance(model.chat(tokenizer, None, "Hello", dict(max_new_tokens=4)), str)
    assert model.generation_engine.runner.dtype == torch.float32
    assert model.to(torch.bfloat16) is model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    response = model.chat(tokenizer, tiles(1).to(torch.bfloat16), "Describe", dict(max_new_tokens=4))
    assert isinstance(response, str)
    assert model.generation_engine.runner.dtype == torch.bfloat16  # the KV cache followed the new dtype
    assert model.chat(tokenizer, None, "Hello", dict(max_new_tokens=4)) is not None
    # and back (values were rounded to bfloat16, so only the dtype is checked)
    model.to(torch.float32)
    assert isinstance(model.chat(tokenizer, None, "Hello", dict(max_new_tokens=4)), str)
    assert model.generation_engine.runner.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# chat errors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("question", "num_tiles"), [("<image> and <image>: compare", 1),
                                                      ("<image>\nWhat is it?", 0),
                                                      ("Image-1: <image>\nImage-2: <image>\nImage-3: <image>", 2)])
def test_more_placeholders_than_images(model, tokenizer, question: str, num_tiles: int) -> None:
    pixel_values = tiles(num_tiles) if num_tiles else None
    num_patches_list = [1] * num_tiles if num_tiles > 1 else None
    with pytest.raises(PlaceholderMismatch, match="<image>"):
        model.chat(tokenizer, pixel_values, question, dict(max_new_tokens=2), num_patches_list=num_patches_list)


@pytest.mark.parametrize("num_patches_list", [[1, 1], [4], [1, 1, 2], []])
def test_num_patches_list_not_summing(model, tokenizer, num_patches_list: list[int]) -> None:
    with pytest.raises(PlaceholderMismatch, match="num_patches_list"):
        model.chat(tokenizer, tiles(3), "Describe", dict(max_new_tokens=2), num_patches_list=num_patches_list)


def test_tiles_of_wrong_size(model, tokenizer) -> None:
    with pytest.raises(InvalidRequest, match="448"):
        model.chat(tokenizer, tiles(1, size=224), "Describe", dict(max_new_tokens=2))


@pytest.mark.parametrize("key", ["max_length", "typo_top_p"])
def test_unknown_generation_key(model, tokenizer, key: str) -> None:
    with pytest.raises(InvalidGenerationConfig, match=key):
        model.chat(tokenizer, None, "Hello", {"max_new_tokens": 2, key: 1})


def test_beam_search_options(model, tokenizer) -> None:
    """Beam search runs (its answers are checked against the official ones in tests/golden); what
    transformers refuses with beams is refused, and the serving engine refuses beams itself."""
    assert isinstance(model.chat(tokenizer, None, "Hello", dict(max_new_tokens=2, num_beams=2)), str)
    assert isinstance(model.chat(tokenizer, None, "Hello", dict(max_new_tokens=2, num_beams=1)), str)
    ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3, num_beams=3, num_return_sequences=2, eos_token_id=2)
    assert out.shape[0] == 2 and out.shape[1] <= 4
    with pytest.raises(InvalidGenerationConfig, match="do_sample"):
        model.chat(tokenizer, None, "Hello", dict(max_new_tokens=2, num_beams=2, do_sample=True))
    with pytest.raises(InvalidGenerationConfig, match="streamer"):
        model.chat(tokenizer, None, "Hello", dict(max_new_tokens=2, num_beams=2, streamer=_NullStreamer()))
    with pytest.raises(InvalidGenerationConfig, match="num_return_sequences"):
        model.chat(tokenizer, None, "Hello", dict(max_new_tokens=2, num_beams=2, num_return_sequences=3))
    engine = model.generation_engine
    assert engine is not None
    request = PreparedRequest(prompt="", prompt_token_ids=ids[0].tolist(), images=[], mm_spans=[])
    with pytest.raises(UnsupportedFeature, match="num_beams"):
        engine.add_request("beams", request, SamplingParams(max_new_tokens=2, num_beams=2))


class _NullStreamer:
    def put(self, value) -> None:
        pass

    def end(self) -> None:
        pass


@pytest.mark.parametrize("config", [dict(max_new_tokens=0), dict(temperature=-1.0, do_sample=True),
                                    dict(top_p=0.0, do_sample=True), dict(max_new_tokens=2, min_new_tokens=5)])
def test_out_of_range_generation_values(model, tokenizer, config: dict) -> None:
    with pytest.raises(InvalidGenerationConfig):
        model.chat(tokenizer, None, "Hello", config)


@pytest.mark.parametrize("question", [None, 123, ["Hello"], b"Hello"])
def test_question_not_a_string(model, tokenizer, question) -> None:
    with pytest.raises(InvalidRequest, match="question"):
        model.chat(tokenizer, None, question, dict(max_new_tokens=2))


def test_batch_chat_mismatched_lengths(model, tokenizer) -> None:
    with pytest.raises(PlaceholderMismatch):
        model.batch_chat(tokenizer, tiles(3), ["a", "b"], dict(max_new_tokens=2), num_patches_list=[1, 1, 1])
    with pytest.raises(PlaceholderMismatch):
        model.batch_chat(tokenizer, tiles(2), ["a", "b", "c"], dict(max_new_tokens=2), num_patches_list=[1, 1])
    with pytest.raises(PlaceholderMismatch):  # right length, wrong tile total
        model.batch_chat(tokenizer, tiles(3), ["a", "b"], dict(max_new_tokens=2), num_patches_list=[1, 1])
    with pytest.raises(InvalidRequest):
        model.batch_chat(tokenizer, tiles(2), ["a", "b"], dict(max_new_tokens=2))


def test_batch_chat_rows_equal_single_chats(model, tokenizer) -> None:
    pixel_values = torch.cat([tiles(1, seed=1), tiles(1, seed=2)])
    config = dict(max_new_tokens=6, min_new_tokens=3)
    batch = model.batch_chat(tokenizer, pixel_values, ["Describe the image.", "What is it?"], config,
                             num_patches_list=[1, 1])
    single = [model.chat(tokenizer, pixel_values[:1], "Describe the image.", config),
              model.chat(tokenizer, pixel_values[1:], "What is it?", config)]
    assert batch == single


# --------------------------------------------------------------------------------------------------
# Generation options
# --------------------------------------------------------------------------------------------------

def _sample(model, tokenizer, seed: int) -> str:
    torch.manual_seed(seed)
    return model.chat(tokenizer, None, "Hello", dict(max_new_tokens=8, do_sample=True, temperature=3.0))


def test_sampling_with_fixed_seed_is_reproducible(model, tokenizer) -> None:
    assert _sample(model, tokenizer, 1234) == _sample(model, tokenizer, 1234)
    # the seed matters (a hot temperature on the peaked tiny model), so the equality above is not vacuous
    assert len({_sample(model, tokenizer, seed) for seed in range(4)}) > 1


def test_min_new_tokens(model, tokenizer) -> None:
    inputs = prompt_ids(model, tokenizer)
    stop = stop_id(model, tokenizer)
    free = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          max_new_tokens=20, eos_token_id=stop)
    natural = free.shape[1] - 1
    assert free[0, -1].item() == stop and natural < 20  # it stops on its own ...
    k = natural + 4
    forced = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            max_new_tokens=20, min_new_tokens=k, eos_token_id=stop)
    assert forced.shape[1] - 1 >= k  # ... but not before min_new_tokens
    assert stop not in forced[0, 1:1 + k].tolist()
    response = model.chat(tokenizer, None, "Hello, who are you?", dict(max_new_tokens=20, min_new_tokens=k))
    assert len(response) > len(model.chat(tokenizer, None, "Hello, who are you?", dict(max_new_tokens=20)))


def test_min_new_tokens_counts_like_transformers(model, tokenizer) -> None:
    """transformers' MinNewTokensLengthLogitsProcessor masks the eos while fewer than min_new_tokens ids follow
    the bos generate() starts from: with min_new_tokens = k the eos may be the (k + 1)-th new token."""
    inputs = prompt_ids(model, tokenizer)
    stop = stop_id(model, tokenizer)

    def run(**config) -> list[int]:
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=20,
                             eos_token_id=stop, **config)
        return out[0, 1:].tolist()

    free = run()
    natural = len(free)
    assert free[-1] == stop and natural >= 2
    assert run(min_new_tokens=natural - 1) == free  # the eos at token `natural` is allowed ...
    longer = run(min_new_tokens=natural)  # ... and masked once `natural` tokens must come first
    assert len(longer) > natural and longer[natural - 1] != stop and longer[:natural - 1] == free[:-1]


def test_repetition_penalty_counts_the_bos_and_generated_ids_not_the_prompt(model, tokenizer) -> None:
    """The reference generate() passes embeddings, so transformers' penalty sees only the ids generate tracks: the
    bos it starts from and the generated ids. With a huge penalty none of those comes again, prompt ids still do."""
    inputs = prompt_ids(model, tokenizer)
    prompt = set(inputs["input_ids"][0].tolist())

    def run(**config) -> list[int]:
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12,
                             **config)
        return out[0, 1:].tolist()

    plain = run()
    assert len(set(plain)) < len(plain)  # the tiny model loops without a penalty ...
    penalized = run(repetition_penalty=1000.0)
    assert len(set(penalized)) == len(penalized) and model.config.llm.bos_token_id not in penalized  # ... not with one
    assert set(penalized) & prompt  # the prompt's ids are not penalised (vLLM's scope "all" would forbid them)


class RecordingStreamer:
    """transformers' streamer interface, recording every call."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


def test_streamer_gets_what_transformers_generate_gives_it(model, tokenizer) -> None:
    """The bos column (B, 1) first, then one (B,) column of new ids per step (a finished row gives the pad id), then
    end(), for rows that stop at different steps."""
    pixel_values = tiles(1)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    queries = [model.build_chat_query(None, "Hello, who are you?")[1],
               model.build_chat_query(pixel_values, "Describe")[1]]
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    streamer = RecordingStreamer()
    stop = stop_id(model, tokenizer)
    out = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                         attention_mask=inputs["attention_mask"], max_new_tokens=12, eos_token_id=stop,
                         streamer=streamer)
    lengths = [row.index(stop) + 1 if stop in row else len(row) for row in out[:, 1:].tolist()]
    assert len(set(lengths)) == 2  # the rows really end at different steps
    assert streamer.ends == 1
    assert streamer.puts[0].tolist() == [[model.config.llm.bos_token_id]] * 2
    assert all(p.shape == (2,) for p in streamer.puts[1:])
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, 1:])

    single = RecordingStreamer()
    alone = model.generate(input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1],
                           max_new_tokens=5, streamer=single)
    assert single.puts[0].shape == (1, 1) and all(p.shape == (1,) for p in single.puts[1:])
    assert [p.item() for p in single.puts] == alone[0].tolist() and single.ends == 1


def test_visual_features_stand_for_pixel_values(model, tokenizer) -> None:
    pixel_values = tiles(2, seed=3)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    inputs = tokenizer(model.build_chat_query(pixel_values, "Describe")[1], return_tensors="pt")
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6)
    encoded = model.generate(pixel_values=pixel_values, **kwargs)
    given = model.generate(pixel_values=pixel_values, visual_features=model.extract_feature(pixel_values), **kwargs)
    assert given.tolist() == encoded.tolist()
    with pytest.raises(PlaceholderMismatch, match="feature rows"):
        model.generate(pixel_values=pixel_values, visual_features=model.extract_feature(pixel_values[:1]), **kwargs)


def test_one_engine_reused_and_grown_per_call(tokenizer) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32).eval()
    assert model.generation_engine is None
    model.chat(tokenizer, None, "Hello", dict(max_new_tokens=4))
    engine = model.generation_engine
    assert engine is not None and engine.config.enable_prefix_caching is False
    model.chat(tokenizer, None, "Hello", dict(max_new_tokens=4))
    assert model.generation_engine is engine  # reused
    blocks = engine.config.num_blocks
    model.chat(tokenizer, None, "Hello", dict(max_new_tokens=16 * blocks))  # needs a larger KV cache
    grown = model.generation_engine
    assert grown is not engine and grown.config.num_blocks > blocks
    model.batch_chat(tokenizer, None, ["a", "b", "c"], dict(max_new_tokens=4), num_patches_list=[0, 0, 0])
    assert model.generation_engine.config.max_num_seqs >= 3
    assert model.generation_engine.config.num_blocks >= grown.config.num_blocks  # never shrinks
    engine = model.generation_engine
    assert not engine.has_unfinished_requests() and engine.num_free_blocks == engine.config.num_blocks


def test_prompt_past_the_context_is_refused(model, tokenizer) -> None:
    context = model.config.llm.max_position_embeddings
    with pytest.raises(ContextLengthExceeded):
        model.chat(tokenizer, None, "Hello", dict(max_new_tokens=context))
    queries = [model.build_chat_query(None, q)[1] for q in ("Hi", "Hello, who are you? Tell me a story")]
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    short = int(inputs["attention_mask"][0].sum())
    with pytest.raises(ContextLengthExceeded):  # the second row is too long: the first is withdrawn too
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       max_new_tokens=context - short)
    engine = model.generation_engine
    assert not engine.has_unfinished_requests() and engine.num_free_blocks == engine.config.num_blocks
    assert isinstance(model.chat(tokenizer, None, "Hello", dict(max_new_tokens=4)), str)


@pytest.mark.parametrize("max_new_tokens", [1, 3, 9])
def test_max_new_tokens_bounds_output(model, tokenizer, max_new_tokens: int) -> None:
    inputs = prompt_ids(model, tokenizer)
    bos = model.config.llm.bos_token_id
    # no stop token: exactly max_new_tokens new ids after the bos
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         max_new_tokens=max_new_tokens)
    assert out.shape == (1, 1 + max_new_tokens) and out[0, 0].item() == bos
    # with the chat stop token and min_new_tokens past it: still bounded
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         eos_token_id=stop_id(model, tokenizer))
    assert out.shape == (1, 1 + max_new_tokens)


def test_default_max_new_tokens(model, tokenizer) -> None:
    inputs = prompt_ids(model, tokenizer)
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert out.shape[1] == 20  # transformers' default max_length 20, counting the bos


@pytest.mark.parametrize(("question", "num_tiles"), [("Hello, who are you?", 0), ("Tell me a story", 1),
                                                      ("你好", 0)])
def test_text_iterator_streamer(model, tokenizer, question: str, num_tiles: int) -> None:
    pixel_values = tiles(num_tiles) if num_tiles else None
    config = dict(max_new_tokens=24, min_new_tokens=16, do_sample=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.chat(tokenizer, pixel_values, question, dict(config, streamer=streamer))
        except BaseException as exc:  # noqa: BLE001 - surfaced below rather than lost in the thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run)
    thread.start()
    parts = list(streamer)
    thread.join(timeout=60)
    assert not errors and not thread.is_alive()
    assert parts
    assert "".join(parts) == model.chat(tokenizer, pixel_values, question, config)


# --------------------------------------------------------------------------------------------------
# Public names
# --------------------------------------------------------------------------------------------------

INIT = Path(internvl_runtime.__file__)
QUICK_START = {"AutoModel", "AutoTokenizer", "load_image", "load_video", "TextIteratorStreamer", "InternVLChatModel"}


def _documented_all() -> list[str]:
    """The ``__all__`` list literal written in ``internvl_runtime/__init__.py``."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("__all__ is not a literal list in internvl_runtime/__init__.py")


def test_public_names() -> None:
    documented = _documented_all()
    assert len(documented) == len(set(documented))
    assert internvl_runtime.__all__ == documented
    assert set(documented) >= QUICK_START
    assert {name for name in dir(internvl_runtime.errors) if name.endswith(("Error", "Exceeded", "Mismatch",
                                                                             "Request", "Feature", "Found",
                                                                             "Overloaded", "Config"))
            if isinstance(getattr(internvl_runtime.errors, name), type)} <= set(documented)
    for name in documented:
        assert getattr(internvl_runtime, name) is not None, name
        namespace: dict = {}
        exec(f"from internvl_runtime import {name}", namespace)
        assert namespace[name] is getattr(internvl_runtime, name)
    assert isinstance(internvl_runtime.__version__, str)
    namespace = {}
    exec("from internvl_runtime import *", namespace)
    assert set(documented) - {"__version__"} <= set(namespace)
