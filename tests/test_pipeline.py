"""Text pipelines: parsing, typed coercion, errors with columns, named pipelines, round trip."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irtool import registry
from irtool.errors import PipelineError
from irtool.passmanager import Pass, PassResult
from irtool.pipeline import PassSpec, Pipeline, Regex, format_pipeline, parse_pipeline


class Method(enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"


@registry.register_pass
class TypedPass(Pass):
    """A pass with every kind of option, for parser tests."""

    name = "typed-test"

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        round_to: int = 1
        enabled: bool = True
        method: Method = Method.MINMAX
        exclude: tuple[Regex, ...] = ()
        label: str = "x"
        budget: float | None = None

    def run(self, model, ctx):
        return PassResult(modified=False)


registry.register_pipeline("typed-pair-test", "typed-test{ratio=0.25},typed-test")
registry.register_pipeline("loop-a-test", "loop-b-test")
registry.register_pipeline("loop-b-test", "loop-a-test")


def options_of(pipeline: Pipeline, index: int = 0) -> dict:
    return dict(pipeline.passes[index].options)


def test_options_are_coerced_from_annotations():
    p = parse_pipeline("typed-test{ratio=0.75,round-to=8,enabled=false,method=entropy,"
                       "exclude=[conv1,'^head\\\\.[0-9]+$'],label='a b',budget=0.1}")
    opts = options_of(p)
    assert opts["ratio"] == 0.75 and isinstance(opts["ratio"], float)
    assert opts["round_to"] == 8 and isinstance(opts["round_to"], int)
    assert opts["enabled"] is False
    assert opts["method"] is Method.ENTROPY
    assert opts["exclude"] == ("conv1", r"^head\.[0-9]+$")
    assert opts["label"] == "a b"
    assert opts["budget"] == 0.1


def test_defaults_filled_and_equal_however_spelled():
    assert parse_pipeline("typed-test") == parse_pipeline("typed-test{ratio=0.5, round-to=1}")
    assert parse_pipeline(" typed-test {} ") == parse_pipeline("typed-test")


def test_canonical_text_prints_non_defaults_only():
    p = parse_pipeline("typed-test{round-to=8,ratio=0.5,method=ENTROPY}")
    assert format_pipeline(p) == "typed-test{round-to=8,method=entropy}"  # declaration order
    assert str(p) == format_pipeline(p)


def test_named_pipeline_expands_in_place():
    p = parse_pipeline("dce,typed-pair-test")
    assert [s.name for s in p.passes] == ["dce", "typed-test", "typed-test"]
    assert options_of(p, 1)["ratio"] == 0.25


def test_named_pipeline_options_go_to_every_pass_that_has_them():
    """Over what the pipeline gives each pass: the first keeps its ratio when only round-to is given."""
    p = parse_pipeline("typed-pair-test{round-to=4}")
    assert [(o["ratio"], o["round_to"]) for o in (options_of(p, 0), options_of(p, 1))] == [(0.25, 4), (0.5, 4)]
    assert [options_of(parse_pipeline("typed-pair-test{ratio=0.9}"), i)["ratio"] for i in (0, 1)] == [0.9, 0.9]


def test_quant_takes_an_exclusion_and_a_target():
    """`quant{exclude=...,min-sqnr=30}`: insert-qdq and bias-correct get both, in place of the 20 dB quant gives
    them (the quantized copy bias-correct measures leaves the same layers float), and quant-dynamic the exclusion
    (an excluded embedding lookup keeps its float table); calibrate, which has neither, is the same as in plain
    `quant`."""
    plain, given = parse_pipeline("quant"), parse_pipeline("quant{exclude='^/detect/dfl',min-sqnr=30}")
    assert [s.name for s in plain.passes] == [s.name for s in given.passes]
    changed = [(a.name, dict(b.options)) for a, b in zip(plain.passes, given.passes, strict=True) if a != b]
    assert [name for name, _ in changed] == ["bias-correct", "insert-qdq", "quant-dynamic"]
    assert changed[0][1]["exclude"] == ("^/detect/dfl",) and changed[0][1]["min_sqnr"] == 30.0
    assert changed[1][1]["exclude"] == ("^/detect/dfl",) and changed[1][1]["min_sqnr"] == 30.0
    assert changed[2][1]["exclude"] == ("^/detect/dfl",)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("typed-tst", "did you mean 'typed-test'"),
        ("typed-test{ration=1}", "unknown option 'ration' of pass 'typed-test' (did you mean 'ratio'?)"),
        ("typed-test{ratio=abc}", "expected a number, got 'abc'"),
        ("typed-test{round-to=1.5}", "expected an integer"),
        ("typed-test{enabled=maybe}", "expected true or false"),
        ("typed-test{method=kl}", "expected one of minmax, entropy"),
        ("typed-test{exclude=['(']}", "invalid regular expression"),
        ("typed-test{ratio=1,ratio=2}", "given twice"),
        ("typed-test{ratio}", "column 17: expected '=' after option key 'ratio'"),
        ("typed-test{ratio=1", "column 19: expected '}' to close the options"),
        ("typed-test,,dce", "column 12: expected a pass name"),
        ("typed-test dce", "column 12: expected ',' between passes"),
        ("typed-test{label='open}", "unterminated quoted value"),
        ("", "empty pipeline"),
        ("Typed-Test", "not a kebab-case pass name"),
        ("typed-pair-test{ration=1}", "column 17: no pass of named pipeline 'typed-pair-test' takes option 'ration'"),
        ("typed-pair-test{ratio=1,ratio=2}", "column 25: option 'ratio' given twice"),
        ("typed-pair-test{ratio=abc}", "option 'ratio' of pass 'typed-test': expected a number"),
        ("loop-a-test", "expands to itself"),
    ],
)
def test_malformed_or_unknown_text_raises_pipeline_error(text, fragment):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_pass_lists_valid_names():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("nope")
    assert "valid:" in str(info.value) and "dce" in str(info.value)


def test_build_instantiates_passes_with_options():
    built = parse_pipeline("typed-test{ratio=0.3},dce").build()
    assert [p.name for p in built] == ["typed-test", "dce"]
    assert built[0].options.ratio == 0.3


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)


REGEXES = ["a", "b.*", r"^x\.y$", "a,b", "[0-9]{2}", "q'r"]


@st.composite
def typed_specs(draw) -> PassSpec:
    opts = TypedPass.Options(
        ratio=draw(st.floats(allow_nan=False, allow_infinity=False, width=64)),
        round_to=draw(st.integers(-10**6, 10**6)),
        enabled=draw(st.booleans()),
        method=draw(st.sampled_from(list(Method))),
        exclude=tuple(Regex(s) for s in draw(st.lists(st.sampled_from(REGEXES), max_size=3))),
        label=draw(_TEXT),
        budget=draw(st.none() | st.floats(0, 1)),
    )
    return PassSpec("typed-test", tuple((k, getattr(opts, k)) for k in opts.__dataclass_fields__))


@settings(max_examples=200, deadline=None)
@given(st.lists(typed_specs() | st.just(PassSpec("dce", ())), min_size=1, max_size=4))
def test_pipeline_text_round_trips(specs):
    pipeline = Pipeline(tuple(specs))
    text = format_pipeline(pipeline)
    assert parse_pipeline(text) == pipeline
    assert format_pipeline(parse_pipeline(text)) == text
