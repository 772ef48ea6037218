"""Structured output: token bytes from our tokenizers, the bitmask, and every constraint kind through
LLMEngine on the tiny random-weight InternVL2-1B: the outputs parse and validate, whatever the weights."""

from __future__ import annotations

import functools
import json
import re

import jsonschema
import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.engine.engine import EngineConfig, LLMEngine, RequestOutput
from internvl_runtime.engine.sampler import Sampler, SamplerOutput, SamplingRow
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.structured_output import (
    StructuredOutputBackend,
    apply_token_bitmask,
    token_bytes,
    unpack_bitmask,
)
from internvl_runtime.errors import InvalidRequest, RequestFailed
from internvl_runtime.processing.inputs import Message
from internvl_runtime.processing.structured_output import StructuredOutput, TaggedJSON
from paths import FIXTURES

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "role", "tags"],
    "additionalProperties": False,
}
CALL = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,6}-[0-9]{2,4}"
CHOICES = ("red", "green", "blue", "dark magenta")
GBNF = 'root ::= "x=" [0-9] [0-9]? ("," [a-c])?'
LARK = 'start: "size: " SIZE " " UNIT\nSIZE: /[1-9][0-9]?/\nUNIT: "cm" | "in"'
TAGGED = TaggedJSON(begin="<tool_call>\n", end="\n</tool_call>", schemas=(CALL, {"type": "integer", "maximum": 99}),
                    min_items=1, max_items=3)


@functools.lru_cache(maxsize=1)
def _loaded() -> tuple[object, object]:
    path = FIXTURES / "ckpt" / "tiny-1B"
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=1)
def _backend() -> StructuredOutputBackend:
    model, tokenizer = _loaded()
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64))
    return engine.structured_output_backend


def _engine(sampler: Sampler | None = None, **config: int) -> LLMEngine:
    model, tokenizer = _loaded()
    config.setdefault("num_blocks", 1024)
    # the grammar engine is built once and shared: reading the vocabulary is the slow part
    return LLMEngine(model, tokenizer, EngineConfig(**config), sampler=sampler, structured_output=_backend())


def _prompt(engine: LLMEngine, text: str = "Answer in the requested format."):
    return engine.processor.prepare([Message("user", text)])


def _check(constraint: StructuredOutput, text: str) -> None:
    """The output satisfies ``constraint`` (raises otherwise)."""
    if constraint.json_schema is not None:
        jsonschema.validate(json.loads(text), constraint.json_schema)
    elif constraint.json_object:
        assert isinstance(json.loads(text), dict), text
    elif constraint.regex is not None:
        assert re.fullmatch(constraint.regex, text), text
    elif constraint.choice is not None:
        assert text in constraint.choice, text
    elif constraint.grammar == GBNF:
        assert re.fullmatch(r"x=[0-9][0-9]?(,[a-c])?", text), text
    elif constraint.grammar == LARK:
        assert re.fullmatch(r"size: [1-9][0-9]? (cm|in)", text), text
    else:
        tagged = constraint.tagged_json
        assert tagged is not None
        body = re.escape(tagged.begin) + "(.*?)" + re.escape(tagged.end)
        assert re.fullmatch(f"{body}(?:{re.escape(tagged.separator)}{body})*", text, re.S), text
        items = re.findall(body, text, re.S)
        assert tagged.min_items <= len(items) <= (tagged.max_items or len(items)), text
        for item in items:
            value = json.loads(item)
            assert any(jsonschema.Draft202012Validator(s).is_valid(value) for s in tagged.schemas), item


CONSTRAINTS = {
    "json_schema": StructuredOutput(json_schema=PERSON),
    "json_object": StructuredOutput(json_object=True),
    "regex": StructuredOutput(regex=REGEX),
    "choice": StructuredOutput(choice=CHOICES),
    "gbnf": StructuredOutput(grammar=GBNF),
    "lark": StructuredOutput(grammar=LARK),
    "tagged_json": StructuredOutput(tagged_json=TAGGED),
}


# -- the tokenizer's bytes and the bitmask --------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-76B"])
def test_token_bytes_concatenate_to_the_encoded_text(variant: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / variant)
    tokens, special = token_bytes(tokenizer)
    assert len(tokens) == len(tokenizer)
    assert set(special) == set(tokenizer.added_tokens_decoder)
    for text in ['{"name":"Zoë","n":[1, 2]}\n', "  leading spaces\tand tabs", "数字 7 été"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        # sentencepiece encodes a text with its dummy-prefix space ("▁"), a real space inside an output
        assert b"".join(tokens[i] for i in ids) in (text.encode("utf-8"), b" " + text.encode("utf-8")), (variant, text)


def test_apply_token_bitmask_matches_a_reference_for_every_dtype() -> None:
    torch.manual_seed(0)
    vocab = 100
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32)   # 96 bits: tokens 96..99 disallowed
    allowed = torch.tensor([[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 if t < 96 else 0 for t in range(vocab)]
                            for r in range(3)], dtype=torch.bool)
    assert torch.equal(unpack_bitmask(bitmask, vocab, torch.device("cpu")).bool(), allowed)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = (torch.randn(3, vocab) * 50).to(dtype)
        expected = logits.masked_fill(~allowed, float("-inf"))
        apply_token_bitmask(logits, bitmask)
        assert torch.equal(logits, expected), dtype


def test_special_tokens_are_never_allowed_but_the_stop_id_is_once_complete() -> None:
    backend = _backend()
    _, tokenizer = _loaded()
    matcher = backend.matcher(StructuredOutput(choice=("no",)))
    assert matcher.accept(tokenizer.encode("no", add_special_tokens=False)[0])
    allowed = unpack_bitmask(backend.fill_bitmask([backend.matcher(StructuredOutput(regex=".{0,3}"))]),
                             backend.vocab_size, torch.device("cpu"))[0]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    others = [i for i in tokenizer.added_tokens_decoder if i != stop]
    assert allowed[stop] == 1 and allowed[others].sum() == 0


# -- through the engine ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_each_constraint_kind_holds_for_greedy_and_sampled_rows(kind: str) -> None:
    engine = _engine()
    constraint = CONSTRAINTS[kind]
    params = [SamplingParams(max_new_tokens=256, temperature=0, structured_output=constraint)]
    params += [SamplingParams(max_new_tokens=256, temperature=1.5, seed=seed, structured_output=constraint)
               for seed in range(4)]
    outputs = engine.generate([_prompt(engine)] * len(params), params)
    for out in outputs:
        assert out.finish_reason == "stop", (kind, out.text)
        _check(constraint, out.text)
    assert engine.num_free_blocks == engine.num_blocks


UNBOUNDED = {   # what a pydantic model gives: no length bounds anywhere
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "temperature": {"type": "integer"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "source": {"type": "object", "properties": {"name": {"type": "string"}, "url": {"type": "string"}},
                   "required": ["name", "url"]},
    },
    "required": ["city", "temperature", "notes", "source"],
}


@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-76B"])
def test_unbounded_schemas_still_end_within_the_budget_on_every_tokenizer(variant: str) -> None:
    """A random model in an unbounded string runs on; the end game (the last tokens of the budget keep
    only the tokens that finish the output) makes it end with text that parses and validates."""
    model, tokenizer = AutoModel.from_pretrained(FIXTURES / "ckpt" / variant), \
        AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / variant)
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=1024))
    tool = TaggedJSON(begin="<tool_call>\n", end="\n</tool_call>", schemas=(
        {"type": "object", "properties": {"name": {"const": "lookup"}, "arguments": {"type": "object"}},
         "required": ["name", "arguments"]},))
    constraints = [StructuredOutput(json_schema=UNBOUNDED), StructuredOutput(json_object=True),
                   StructuredOutput(tagged_json=tool)]
    params = [SamplingParams(max_new_tokens=96, temperature=0, structured_output=c) for c in constraints]
    params += [SamplingParams(max_new_tokens=96, temperature=1.0, seed=seed, structured_output=c)
               for seed, c in enumerate(constraints)]
    for question in ("What is the weather in Paris?", "Describe."):
        outputs = engine.generate([engine.processor.prepare([Message("user", question)])] * len(params), params)
        for out, p in zip(outputs, params, strict=True):
            assert p.structured_output is not None
            assert out.finish_reason == "stop", (variant, out.text)
            # Phi-3's slow decode puts a space after the prompt's last special token (its
            # spaces_between_special_tokens), before the output's text: whitespace the grammar never made
            _check(p.structured_output, out.text.lstrip(" ") if variant == "tiny-4B" else out.text)


def test_a_batch_mixing_constrained_and_unconstrained_rows_leaves_the_free_rows_alone() -> None:
    engine = _engine()
    free = [SamplingParams(max_new_tokens=12, temperature=0),
            SamplingParams(max_new_tokens=12, temperature=0.9, seed=5),
            SamplingParams(max_new_tokens=12, temperature=0, presence_penalty=1.0, logit_bias={9: 3.0})]
    alone = [engine.generate([_prompt(engine)], p)[0].token_ids for p in free]
    constrained = [SamplingParams(max_new_tokens=256, temperature=0, structured_output=CONSTRAINTS["json_schema"]),
                   SamplingParams(max_new_tokens=256, temperature=1.0, seed=1, min_p=0.05, top_k=40,
                                  frequency_penalty=0.5, structured_output=CONSTRAINTS["tagged_json"]),
                   SamplingParams(max_new_tokens=64, temperature=0, structured_output=CONSTRAINTS["choice"])]
    params = [constrained[0], free[0], constrained[1], free[1], constrained[2], free[2]]
    outputs = engine.generate([_prompt(engine)] * len(params), params)
    assert [outputs[i].token_ids for i in (1, 3, 5)] == alone
    for out, p in zip([outputs[i] for i in (0, 2, 4)], constrained, strict=True):
        assert p.structured_output is not None
        _check(p.structured_output, out.text)


def test_constrained_outputs_survive_preemption() -> None:
    reference = _engine()
    params = [SamplingParams(max_new_tokens=200, temperature=0, structured_output=c)
              for c in (CONSTRAINTS["json_schema"], CONSTRAINTS["tagged_json"], CONSTRAINTS["regex"])] * 2
    prompts = [_prompt(reference, "word " * (20 + 7 * i)) for i in range(len(params))]
    alone = [reference.generate([r], p)[0] for r, p in zip(prompts, params, strict=True)]
    tight = _engine(num_blocks=140, block_size=4, max_num_seqs=6, max_num_batched_tokens=256)
    preempted: list[str] = []
    original = tight.scheduler.schedule

    def schedule():   # record the preemptions the tight pool forces
        batch = original()
        preempted.extend(seq.request_id for seq in batch.preempted)
        return batch

    tight.scheduler.schedule = schedule   # type: ignore[method-assign]
    batched = tight.generate(prompts, params)
    assert preempted, "the pool was not tight enough to preempt"
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    for out, p in zip(batched, params, strict=True):
        assert p.structured_output is not None
        _check(p.structured_output, out.text)


@pytest.mark.parametrize("constraint", [
    StructuredOutput(json_schema={"type": "nonsense"}),
    StructuredOutput(json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
    StructuredOutput(regex="(unclosed"),
    StructuredOutput(grammar="root ::= ( broken"),
    StructuredOutput(grammar="start: undefined_rule"),
    StructuredOutput(tagged_json=TaggedJSON(begin="<a>", end="</a>", schemas=({"type": 7},))),
])
def test_a_bad_constraint_is_refused_at_add_request(constraint: StructuredOutput) -> None:
    engine = _engine()
    with pytest.raises(InvalidRequest, match="invalid"):
        engine.add_request("bad", _prompt(engine), SamplingParams(structured_output=constraint))
    assert not engine.has_unfinished_requests() and engine.stats["requests_refused"] == 1
    engine.add_request("bad", _prompt(engine), SamplingParams(max_new_tokens=2))   # the id is free again


def test_logit_bias_outside_the_vocabulary_is_refused() -> None:
    engine = _engine()
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.add_request("r", _prompt(engine), SamplingParams(logit_bias={engine.vocab_size: 1.0}))
    engine.add_request("r", _prompt(engine), SamplingParams(logit_bias={engine.vocab_size - 1: 1.0}))


def test_abort_mid_way_frees_the_request_and_the_others_go_on() -> None:
    engine = _engine()
    json_params = SamplingParams(max_new_tokens=256, temperature=0, structured_output=CONSTRAINTS["json_schema"])
    engine.add_request("a", _prompt(engine), json_params)
    engine.add_request("b", _prompt(engine), json_params)
    seen: dict[str, list[RequestOutput]] = {"a": [], "b": []}
    for _ in range(4):
        for out in engine.step():
            seen[out.request_id].append(out)
    assert seen["a"] and not seen["a"][-1].finished
    assert engine.abort_request("a")
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "b"
            final = out
    assert final is not None and final.finish_reason == "stop"
    _check(CONSTRAINTS["json_schema"], final.text)
    assert engine.num_free_blocks == engine.num_blocks and not engine._states


class _WrongTokenSampler(Sampler):
    """Samples as usual, except that the row of request ``victim`` gets ``token`` (a grammar must refuse it)."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.victim_params: SamplingParams | None = None

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:  # type: ignore[override]
        out = super().__call__(logits, rows)
        for i, row in enumerate(rows):
            if row.params is self.victim_params:
                out.token_ids[i] = self.token
        return out


def test_a_token_the_grammar_rejects_fails_that_request_alone() -> None:
    _, tokenizer = _loaded()
    sampler = _WrongTokenSampler(tokenizer.encode("z", add_special_tokens=False)[0])
    engine = _engine(sampler=sampler)
    victim = SamplingParams(max_new_tokens=50, temperature=0, structured_output=StructuredOutput(regex="[0-9]+"))
    sampler.victim_params = victim
    other = SamplingParams(max_new_tokens=200, temperature=0, structured_output=CONSTRAINTS["json_schema"])
    engine.add_request("victim", _prompt(engine), victim)
    engine.add_request("other", _prompt(engine), other)
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["victim"].finish_reason == "error" and isinstance(finals["victim"].error, RequestFailed)
    assert "rejected" in str(finals["victim"].error)
    assert finals["other"].finish_reason == "stop"
    _check(CONSTRAINTS["json_schema"], finals["other"].text)
    assert engine.stats["requests_failed"] == 1 and engine.num_free_blocks == engine.num_blocks


def test_a_complete_choice_finishes_at_once_without_the_stop_token() -> None:
    engine = _engine()
    constraint = StructuredOutput(choice=("dark magenta",))
    out = engine.generate([_prompt(engine)], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True,
                                                            structured_output=constraint))[0]
    _, tokenizer = _loaded()
    assert out.text == "dark magenta" and out.finish_reason == "stop"
    assert out.token_ids == tokenizer.encode("dark magenta", add_special_tokens=False) or \
        tokenizer.decode(out.token_ids) == "dark magenta"


def test_response_format_shapes() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    openai = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert StructuredOutput.from_response_format(openai) == StructuredOutput(json_schema=schema)
    assert StructuredOutput.from_response_format({"type": "json_object"}) == StructuredOutput(json_object=True)
    assert StructuredOutput.from_response_format({"type": "regex_schema", "regex_schema": "a+"}) == \
        StructuredOutput(regex="a+")
    assert StructuredOutput.from_response_format({"type": "text"}) is None
    assert StructuredOutput.from_response_format(None) is None
    for bad in ({"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}},
                {"type": "regex_schema"}, "json"):
        with pytest.raises(InvalidRequest):
            StructuredOutput.from_response_format(bad)  # type: ignore[arg-type]


def test_logits_wider_than_the_tokenizer_are_masked_past_it() -> None:
    """Some checkpoints have more embedding rows than tokens: the rows past the tokenizer are never allowed."""
    _, tokenizer = _loaded()
    backend = StructuredOutputBackend(tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")], len(tokenizer) + 90)
    matcher = backend.matcher(StructuredOutput(regex=".{0,4}"))
    logits = torch.zeros(1, len(tokenizer) + 90)
    apply_token_bitmask(logits, backend.fill_bitmask([matcher]))
    assert torch.isfinite(logits[0, :len(tokenizer)]).sum() > 100
    assert not torch.isfinite(logits[0, len(tokenizer):]).any()


def test_tagged_json_tags_made_of_special_tokens_are_emitted_as_those_tokens() -> None:
    """InternLM2's action format: <|action_start|><|plugin|>\\n{...}<|action_end|>\\n, its tags special tokens."""
    path = FIXTURES / "ckpt" / "tiny-2B"
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=512))
    call = {"type": "object", "properties": {"name": {"const": "search"}, "parameters": {"type": "object"}},
            "required": ["name", "parameters"], "additionalProperties": False}
    tagged = TaggedJSON(begin="<|action_start|><|plugin|>\n", end="<|action_end|>\n", schemas=(call,), max_items=1)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|action_start|>", "<|plugin|>",
                                                                   "<|action_end|>")}
    params = [SamplingParams(max_new_tokens=96, temperature=0, structured_output=StructuredOutput(tagged_json=tagged)),
              SamplingParams(max_new_tokens=96, temperature=1.0, seed=2,
                             structured_output=StructuredOutput(tagged_json=tagged))]
    for out in engine.generate([_prompt(engine)] * 2, params):
        assert out.finish_reason == "stop"
        assert out.token_ids[:2] == [ids["<|action_start|>"], ids["<|plugin|>"]]
        assert ids["<|action_end|>"] in out.token_ids
        text = tokenizer.decode(out.token_ids, skip_special_tokens=False)
        body = text.split("<|plugin|>", 1)[1].split("<|action_end|>", 1)[0]
        jsonschema.validate(json.loads(body), call)


def test_forced_text_that_spells_a_special_token_is_written_with_plain_tokens() -> None:
    """A literal in a grammar (``<ref>`` here, a special token of the InternVL tokenizers) is text: the grammar
    engine sees special tokens only as ``<[id]>`` tags, so forcing the text must not hand it the special id."""
    engine = _engine()
    answer = "<ref>the red car</ref><box>[[1, 2, 3, 4]]</box>"
    out = engine.generate([_prompt(engine)], SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True,
                                                            structured_output=StructuredOutput(choice=(answer,))))[0]
    assert out.error is None and out.finish_reason == "stop"
    _, tokenizer = _loaded()
    assert tokenizer.decode(out.token_ids, skip_special_tokens=False) == answer
