"""LMDeploy's pipeline API as its InternVL2 documentation uses it, with only the import line changed.

The snippets follow LMDeploy's docs (``multi_modal/internvl.md``, ``multi_modal/vl_pipeline.md``,
``llm/pipeline.md``) on the tiny 1B checkpoint: hub ids become the checkpoint folder, image URLs become the
fixture images (paths or data URLs), and answers are kept to a few tokens. Then each method and each mapped
configuration field is checked against what it must do here."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from internvl_runtime import (
    ChatTemplateConfig,
    EngineConfig,
    GenerationConfig,
    PytorchEngineConfig,
    Response,
    TurbomindEngineConfig,
    VisionConfig,
    pipeline,
)
from internvl_runtime.api.lmdeploy_config import TILES_PER_IMAGE, engine_settings
from internvl_runtime.errors import InvalidGenerationConfig, InvalidRequest, UnsupportedFeature
from internvl_runtime.processing.image import count_tiles
from internvl_runtime.processing.inputs import Message
from internvl_runtime.vl import encode_image_base64, load_image
from internvl_runtime.vl.constants import IMAGE_TOKEN
from paths import FIXTURES

MODEL = str(FIXTURES / "ckpt" / "tiny-1B")
TIGER = str(FIXTURES / "data" / "img_800x600.png")
HUMAN_POSE = str(FIXTURES / "data" / "img_500x400.png")
SHORT = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def pipe():
    # LMDeploy's docs: pipeline(model, backend_config=TurbomindEngineConfig(session_len=8192))
    with pipeline(MODEL, backend_config=TurbomindEngineConfig(session_len=8192, max_batch_size=8,
                                                              enable_prefix_caching=True)) as p:
        yield p


# -- the documented snippets ------------------------------------------------------------------------------

def test_offline_inference_snippet(pipe) -> None:
    image = load_image(TIGER)
    response = pipe(("describe this image", image), gen_config=SHORT)
    assert isinstance(response, Response) and response.generate_token_len >= 1
    assert response.input_token_len > 13 * 256             # 800x600: 12 tiles + the thumbnail
    assert pipe.engine.max_model_len == 8192 and pipe.engine.config.max_num_seqs == 8
    # the image given as a path is the same input
    assert pipe(("describe this image", TIGER), gen_config=SHORT).token_ids == response.token_ids


def test_multi_image_snippet_with_image_token_and_max_dynamic_patch(pipe) -> None:
    image_urls = [TIGER, HUMAN_POSE]
    images = [load_image(img_url) for img_url in image_urls]
    response = pipe((f"Image-1: {IMAGE_TOKEN}\nImage-2: {IMAGE_TOKEN}\ndescribe these two images", images),
                    gen_config=SHORT)
    assert response.generate_token_len >= 1

    def url(path: str) -> str:
        return f"data:image/jpeg;base64,{encode_image_base64(load_image(path))}"

    messages = [dict(role="user", content=[
        dict(type="text", text=f"{IMAGE_TOKEN}{IMAGE_TOKEN}\nDescribe the two images in detail."),
        dict(type="image_url", image_url=dict(max_dynamic_patch=12, url=url(TIGER))),
        dict(type="image_url", image_url=dict(max_dynamic_patch=12, url=url(HUMAN_POSE))),
    ])]
    out = pipe(messages, gen_config=GenerationConfig(top_k=1, max_new_tokens=6))
    messages.append(dict(role="assistant", content=out.text))
    messages.append(dict(role="user", content="What are the similarities and differences between these two images."))
    second = pipe(messages, gen_config=GenerationConfig(top_k=1, max_new_tokens=6))
    assert second.input_token_len > out.input_token_len + out.generate_token_len
    # max_dynamic_patch=1 per image: one tile each instead of the official tiling's (13 for both sizes)
    tiles = [count_tiles(*load_image(p).size, min_num=1, max_num=12, use_thumbnail=True, image_size=448)
             for p in (TIGER, HUMAN_POSE)]
    one_tile = [dict(role="user", content=[dict(type="text", text=f"{IMAGE_TOKEN}{IMAGE_TOKEN}\nDescribe.")] + [
        dict(type="image_url", image_url=dict(max_dynamic_patch=1, url=url(p))) for p in (TIGER, HUMAN_POSE)])]
    many = [dict(role="user", content=[dict(type="text", text=f"{IMAGE_TOKEN}{IMAGE_TOKEN}\nDescribe.")] + [
        dict(type="image_url", image_url=dict(max_dynamic_patch=12, url=url(p))) for p in (TIGER, HUMAN_POSE)])]
    assert (pipe(many, gen_config=SHORT).input_token_len - pipe(one_tile, gen_config=SHORT).input_token_len
            == (sum(tiles) - 2) * 256)


def test_video_frames_snippet(pipe) -> None:
    imgs = [load_image(str(FIXTURES / "data" / f"frame_{i:03d}.png")) for i in range(0, 40, 5)]   # 8 frames
    question = ""
    for i in range(len(imgs)):
        question = question + f"Frame{i+1}: {IMAGE_TOKEN}\n"
    question += "What is the red panda doing?"
    content = [{"type": "text", "text": question}]
    for img in imgs:
        content.append({"type": "image_url", "image_url": {
            "max_dynamic_patch": 1, "url": f"data:image/jpeg;base64,{encode_image_base64(img)}"}})
    messages = [dict(role="user", content=content)]
    out = pipe(messages, gen_config=GenerationConfig(top_k=1, max_new_tokens=6))
    assert 8 * 256 < out.input_token_len < 9 * 256          # one tile per frame
    messages.append(dict(role="assistant", content=out.text))
    messages.append(dict(role="user", content="Describe this video in detail. Don't repeat."))
    assert pipe(messages, gen_config=GenerationConfig(top_k=1, max_new_tokens=6)).generate_token_len >= 1


def test_multi_turn_chat_snippet(pipe) -> None:
    gen_config = GenerationConfig(top_k=40, top_p=0.8, temperature=0.6, max_new_tokens=6)
    image = load_image(TIGER)
    sess = pipe.chat(("describe this image", image), gen_config=gen_config)
    assert sess.response is not None and isinstance(sess.response.text, str)
    sess = pipe.chat("What is the woman doing?", session=sess, gen_config=gen_config)
    assert len(sess.history) == 2 and sess.history[0][0] == "describe this image"
    assert sess.response is not None and sess.response.cached_tokens > 13 * 256   # the first turn's prefix reused


def test_batch_and_stream_snippets(pipe) -> None:
    image_urls = [TIGER, HUMAN_POSE]
    prompts = [("describe this image", load_image(img_url)) for img_url in image_urls]
    response = pipe(prompts, gen_config=SHORT)
    assert [r.index for r in response] == [0, 1]
    text = ""
    for item in pipe.stream_infer(("describe this image", load_image(TIGER)), gen_config=SHORT):
        text += item.text
    assert text == response[0].text


# -- the methods --------------------------------------------------------------------------------------------

def test_context_manager_closes() -> None:
    with pipeline(MODEL, backend_config=PytorchEngineConfig(session_len=4096, num_gpu_blocks=64, block_size=16),
                  log_level="ERROR") as p:
        assert p.engine.num_blocks == 64 and p.engine.config.block_size == 16
        assert p("hi", gen_config=SHORT).generate_token_len >= 1
        stream = p.stream_infer(["a", "b"], gen_config=SHORT)
        next(stream)                             # two requests now in the engine
        assert p.engine.has_unfinished_requests()
    assert not p.engine.has_unfinished_requests()     # __exit__ closed the pipeline: its requests were aborted
    import logging
    assert logging.getLogger("internvl_runtime").level == logging.ERROR
    logging.getLogger("internvl_runtime").setLevel(logging.NOTSET)


def test_infer_batch_infer_and_n(pipe) -> None:
    one = pipe.infer("hello", SHORT)
    assert isinstance(one, Response)
    assert [r.text for r in pipe.batch_infer(["hello", "bye"], SHORT)] == [one.text, pipe.infer("bye", SHORT).text]
    sampled = GenerationConfig(n=3, do_sample=True, temperature=1.5, random_seed=7, max_new_tokens=6)
    answers = pipe.infer("hello", sampled)
    assert isinstance(answers, list) and len(answers) == 3 and {r.index for r in answers} == {0}
    # the k-th answer is the request seeded random_seed + k
    for k, answer in enumerate(answers):
        alone = pipe.infer("hello", GenerationConfig(do_sample=True, temperature=1.5, random_seed=7 + k,
                                                     max_new_tokens=6))
        assert answer.token_ids == alone.token_ids
    assert len({tuple(a.token_ids) for a in answers}) > 1
    batch = pipe.infer(["hello", "bye"], GenerationConfig(n=2, max_new_tokens=4))
    assert [r.index for r in batch] == [0, 0, 1, 1]
    with pytest.raises(UnsupportedFeature, match="do_preprocess"):
        pipe.infer("hello", SHORT, do_preprocess=False)
    with pytest.raises(UnsupportedFeature, match="adapter"):
        pipe.infer("hello", SHORT, adapter_name="lora")


def test_image_first_tuples(pipe) -> None:
    assert (pipe((load_image(TIGER), "describe"), SHORT).token_ids
            == pipe(("describe", load_image(TIGER)), SHORT).token_ids)
    data_url = "data:image/png;base64," + encode_image_base64(TIGER)
    assert pipe((data_url, "describe"), SHORT).token_ids == pipe(("describe", TIGER), SHORT).token_ids


def test_stream_infer_with_sessions(pipe) -> None:
    sessions = [pipe.session(), pipe.session()]
    assert sessions[0].session_id != sessions[1].session_id
    whole: dict[int, Response] = {}
    for piece in pipe.stream_infer(["hello", ("describe", TIGER)], sessions=sessions, gen_config=SHORT):
        whole[piece.index] = whole[piece.index].extend(piece) if piece.index in whole else piece
    expected = pipe.infer(["hello", ("describe", TIGER)], SHORT)
    for i in (0, 1):
        assert whole[i].text == expected[i].text and whole[i].token_ids == expected[i].token_ids
        assert sessions[i].response is not None and sessions[i].response.text == expected[i].text
    finals = list(pipe.stream_infer(["hello", "bye"], gen_config=SHORT, stream_response=False))
    assert sorted(r.index for r in finals) == [0, 1] and all(r.finish_reason for r in finals)
    with pytest.raises(InvalidRequest, match="sessions"):
        pipe.stream_infer(["a", "b"], sessions=[pipe.session()], gen_config=SHORT)
    with pytest.raises(InvalidRequest, match="gen_config"):
        pipe.stream_infer("a", SHORT)                 # LMDeploy's second argument is sessions
    never_started = pipe.stream_infer(["a", "b"], gen_config=SHORT)
    assert not pipe.engine.has_unfinished_requests()      # added at the first next(), so none is left behind
    del never_started


def test_chat_stream_response_streams(pipe) -> None:
    sess = pipe.session()
    stream = pipe.chat(("describe this image", TIGER), session=sess, gen_config=SHORT, stream_response=True)
    assert not hasattr(stream, "messages")            # an iterator of pieces, not a Session
    pieces = list(stream)
    assert len(pieces) == SHORT.max_new_tokens or pieces[-1].finish_reason == "stop"
    assert sess.response is not None and sess.response.text == "".join(p.text for p in pieces)
    plain = pipe.chat(("describe this image", TIGER), gen_config=SHORT)
    assert plain.response is not None and plain.response.text == sess.response.text
    follow = list(pipe.chat("and then?", session=sess, gen_config=SHORT, stream_response=True))
    assert len(sess.history) == 2 and sess.history[1][1] == "".join(p.text for p in follow)


def test_get_ppl_is_the_mean_next_token_loss(pipe) -> None:
    """sum of losses over P+G minus over P = the generated tokens' negative log-probabilities, which the
    sampler reports for a greedy answer to the text-only prompt P."""
    prepared = pipe.engine.processor.prepare([Message("user", "hello")])
    prompt_ids = prepared.prompt_token_ids
    answer = pipe.infer("hello", GenerationConfig(max_new_tokens=5, logprobs=0, ignore_eos=True))
    assert answer.logprobs is not None and len(answer.logprobs) == 5
    full = prompt_ids + answer.token_ids
    ppl_full, ppl_prompt = pipe.get_ppl([full, prompt_ids])
    generated_nll = ppl_full * (len(full) - 1) - ppl_prompt * (len(prompt_ids) - 1)
    assert generated_nll == pytest.approx(-sum(lp.logprob for lp in answer.logprobs), rel=1e-3, abs=1e-3)
    assert pipe.get_ppl(prompt_ids) == [pytest.approx(ppl_prompt, rel=1e-5)]
    for bad in ([5], [], [[1, 2], [3]], [1, -2], "12"):
        with pytest.raises(InvalidRequest):
            pipe.get_ppl(bad)


def test_generation_config_fields(pipe) -> None:
    base = pipe.infer("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True))
    first = base.token_ids[0]
    assert pipe.infer("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True, min_p=0.05)).token_ids \
        == base.token_ids                                           # min_p leaves greedy alone
    stopped = pipe.infer("hello", GenerationConfig(max_new_tokens=4, stop_token_ids=[first]))
    assert stopped.finish_reason == "stop" and stopped.text == ""
    banned = pipe.infer("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True, bad_token_ids=[first]))
    assert banned.token_ids[0] != first
    word = pipe.tokenizer.decode([first])
    if len(pipe.engine.tokenizer.encode(word, add_special_tokens=False)) == 1:
        by_word = pipe.infer("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True, bad_words=[word]))
        assert by_word.token_ids[0] != first
    with pytest.raises(InvalidGenerationConfig, match="bad_words"):
        pipe.infer("hello", GenerationConfig(bad_words=["a rather long phrase of words"]))
    stop_word = pipe.engine.tokenizer.decode(base.token_ids[1:2])
    if stop_word.strip():
        kept = pipe.infer("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True, stop_words=[stop_word],
                                                    include_stop_str_in_output=True))
        dropped = pipe.infer("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True, stop_words=[stop_word]))
        assert kept.text.endswith(stop_word) and not dropped.text.endswith(stop_word)
    special = pipe.infer("hello", GenerationConfig(max_new_tokens=4, stop_token_ids=[], skip_special_tokens=False))
    assert isinstance(special.text, str)
    for field, value in [("output_last_hidden_state", "generation"),
                         ("logits_processors", [lambda ids, logits: logits]), ("logprob_start_len", 0),
                         ("return_ppl", True), ("repetition_ngram_size", 3)]:
        with pytest.raises(UnsupportedFeature, match=field):
            GenerationConfig(**{field: value})
    for bad in (dict(n=0), dict(output_logits="some"), dict(min_p=1.5), dict(top_p=0.0), dict(temperature=-1.0),
                dict(bad_words="x")):
        with pytest.raises(InvalidGenerationConfig):
            GenerationConfig(**bad)


def test_output_logits(pipe) -> None:
    """The logits an answer's tokens were chosen from: greedy picks each row's argmax, and the rows give the
    sampler's log-probabilities; "all" adds the prompt's rows (an image prompt: its features are in them)."""
    prompt = ("describe this image", TIGER)
    answer = pipe(prompt, GenerationConfig(max_new_tokens=5, ignore_eos=True, logprobs=0, output_logits="generation"))
    assert answer.logits is not None and tuple(answer.logits.shape) == (5, pipe.engine.vocab_size)
    assert answer.logits.argmax(-1).tolist() == answer.token_ids
    assert answer.logprobs is not None
    chosen = answer.logits.log_softmax(-1)[range(5), answer.token_ids]
    assert chosen.tolist() == pytest.approx([lp.logprob for lp in answer.logprobs], abs=1e-3)
    everything = pipe(prompt, GenerationConfig(max_new_tokens=5, ignore_eos=True, output_logits="all"))
    assert everything.logits is not None
    assert everything.logits.shape[0] == everything.input_token_len + 5 - 1
    assert torch.allclose(everything.logits[-5:], answer.logits, atol=1e-4)
    streamed = list(pipe.stream_infer(prompt, gen_config=GenerationConfig(max_new_tokens=5, ignore_eos=True,
                                                                           output_logits="generation")))
    assert streamed[-1].logits is not None and torch.allclose(streamed[-1].logits, answer.logits, atol=1e-4)
    assert pipe(prompt, GenerationConfig(max_new_tokens=5)).logits is None


# -- configuration mapping (no model needed) ----------------------------------------------------------------

def test_turbomind_and_pytorch_configs_map_to_the_engine() -> None:
    settings = engine_settings(MODEL, TurbomindEngineConfig(session_len=1024, max_batch_size=4, tp=1, dtype="bfloat16",
                                                            cache_block_seq_len=32, max_prefill_token_num=2048,
                                                            cache_max_entry_count=0.5, download_dir="/tmp/hub",
                                                            revision="main"),
                               device="cpu")
    assert settings is not None
    cfg = settings.engine_config
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.block_size, cfg.max_num_batched_tokens) == (1024, 4, 32, 2048)
    assert cfg.kv_cache_bytes is not None and cfg.kv_cache_bytes > 0 and not cfg.enable_prefix_caching
    assert str(settings.dtype) == "torch.bfloat16" and settings.tensor_parallel_size == 1
    assert settings.hub is not None and settings.hub.revision == "main" and str(settings.hub.cache_dir) == "/tmp/hub"
    half = engine_settings(MODEL, TurbomindEngineConfig(cache_max_entry_count=0.25), device="cpu")
    assert half is not None and half.engine_config.kv_cache_bytes is not None
    assert half.engine_config.kv_cache_bytes < cfg.kv_cache_bytes      # a smaller share, a smaller cache
    pt = engine_settings(MODEL, PytorchEngineConfig(tp=2, num_gpu_blocks=100, block_size=16), device="cpu",
                         vision_config=VisionConfig(max_batch_size=4), session_len=2048)
    assert pt is not None and pt.tensor_parallel_size == 2
    assert (pt.engine_config.num_blocks, pt.engine_config.block_size, pt.engine_config.max_model_len,
            pt.engine_config.vision_batch_tiles) == (100, 16, 2048, 4 * TILES_PER_IMAGE)
    ours = engine_settings(MODEL, EngineConfig(max_num_seqs=3), device="cpu", session_len=512)
    assert ours is not None and (ours.engine_config.max_num_seqs, ours.engine_config.max_model_len) == (3, 512)
    assert engine_settings(MODEL, None, device="cpu") is None
    with pytest.raises(InvalidRequest, match="session_len"):
        engine_settings(MODEL, TurbomindEngineConfig(session_len=1024), device="cpu", session_len=2048)


@pytest.mark.parametrize("make, field", [
    (lambda: TurbomindEngineConfig(quant_policy=8), "quant_policy"),
    (lambda: TurbomindEngineConfig(model_format="awq"), "model_format"),
    (lambda: TurbomindEngineConfig(rope_scaling_factor=2.5), "rope_scaling_factor"),
    (lambda: TurbomindEngineConfig(dp=2), "dp"),
    (lambda: PytorchEngineConfig(adapters={"a": "/x"}), "adapters"),
    (lambda: PytorchEngineConfig(quant_policy=4), "quant_policy"),
])
def test_fields_that_cannot_be_honoured_are_named(make, field) -> None:
    with pytest.raises(UnsupportedFeature, match=field):
        engine_settings(MODEL, make(), device="cpu")


def test_invalid_and_unsupported_configs() -> None:
    assert engine_settings(MODEL, TurbomindEngineConfig(model_format="hf"), device="cpu") is not None
    with pytest.raises(InvalidRequest, match="dtype"):
        TurbomindEngineConfig(dtype="float32")
    with pytest.raises(InvalidRequest, match="cache_max_entry_count"):
        PytorchEngineConfig(cache_max_entry_count=1.5)
    with pytest.raises(UnsupportedFeature, match="device_type"):
        PytorchEngineConfig(device_type="ascend")
    with pytest.raises(InvalidRequest, match="max_batch_size"):
        VisionConfig(max_batch_size=0)
    with pytest.raises(UnsupportedFeature, match="model_name"):
        ChatTemplateConfig(model_name="vicuna")
    with pytest.raises(UnsupportedFeature, match="user"):
        ChatTemplateConfig(model_name="internvl2-internlm2", user="<user>")
    with pytest.raises(InvalidRequest, match="backend_config"):
        engine_settings(MODEL, {"session_len": 5}, device="cpu")
    with pytest.raises(InvalidRequest, match="log_level"):
        pipeline(MODEL, log_level="LOUD")
    with pytest.raises(UnsupportedFeature, match="speculative"):
        pipeline(MODEL, speculative_config=object())
    with pytest.raises(UnsupportedFeature, match="allowed_media_domains"):
        pipeline(MODEL, allowed_media_domains=["example.com"])
    with pytest.raises(InvalidRequest, match="max_num_seqs"):
        pipeline(MODEL, backend_config=TurbomindEngineConfig(), max_num_seqs=3)


def test_chat_template_config_sets_the_system_message(pipe) -> None:
    system_prompt = "You are a tiny test model."
    chat_template_config = ChatTemplateConfig("internvl2-internlm2")
    chat_template_config.meta_instruction = system_prompt           # as LMDeploy's InternVL docs set it
    with pipeline(MODEL, chat_template_config=chat_template_config,
                  backend_config=TurbomindEngineConfig(session_len=8192)) as custom:
        ours = custom(("describe this image", TIGER), gen_config=SHORT)
        explicit = pipe([{"role": "system", "content": system_prompt},
                         {"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                                      {"type": "image_url", "image_url": {"url": TIGER}}]}], SHORT)
        default = pipe(("describe this image", TIGER), SHORT)
        assert ours.input_token_len == explicit.input_token_len != default.input_token_len
        assert ours.token_ids == explicit.token_ids
        # a conversation's own system message wins
        assert custom([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], SHORT).input_token_len \
            == pipe([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], SHORT).input_token_len


# -- internvl_runtime.vl ------------------------------------------------------------------------------------

def test_vl_load_image_and_encode_image_base64() -> None:
    assert IMAGE_TOKEN == "<IMAGE_TOKEN>"
    image = load_image(TIGER)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (800, 600)
    assert load_image(f"file://{TIGER}").tobytes() == image.tobytes()
    encoded = encode_image_base64(image)
    decoded = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert decoded.format == "PNG" and decoded.convert("RGB").tobytes() == image.tobytes()
    assert load_image(f"data:image/png;base64,{encoded}").tobytes() == image.tobytes()
    assert encode_image_base64(TIGER) == encoded                     # a path is loaded first
    jpeg = base64.b64decode(encode_image_base64(image, format="JPEG"))
    assert jpeg[:2] == b"\xff\xd8"
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert load_image(rgba).mode == "RGB"
