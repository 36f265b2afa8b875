from __future__ import annotations

import copy
import functools
import pickle
import typing as t

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifyqueue import Raw, TemplateError, enqueue
from notifyqueue.templates import (
    Template,
    compile_template,
    compile_templates,
    reads_every_field,
    template_fields,
)


def pickle_round_trip(value: t.Any) -> t.Any:
    return pickle.loads(pickle.dumps(value))


class Froggy:
    id = 7
    name = "Fred"
    _secret = "hidden"


# -- compile_template ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("no fields at all", set()),
        ("{froggy}", {"froggy"}),
        ("{froggy.id} {froggy.name}", {"froggy"}),
        ("{d[key]} {seq[0]} {a.b[c].d}", {"d", "seq", "a"}),
        ("{x!r} {y!s} {z!a}", {"x", "y", "z"}),
        ("{x:>10} {y!r:^12} {z:.2f}", {"x", "y", "z"}),
        ("{{literal}} {x}", {"x"}),
        ("line one\nline two {x}", {"x"}),
    ],
)
def test_compile_template_accepts_named_fields(text: str, fields: set[str]) -> None:
    template = compile_template(text)

    assert isinstance(template, Template)
    assert template == text
    assert template.fields == frozenset(fields)


@pytest.mark.parametrize("text", ["{}", "{0}", "{0.id}", "{0[key]}", "{!r}", "{:>3}"])
def test_compile_template_refuses_positional_fields(text: str) -> None:
    with pytest.raises(TemplateError, match="positional field"):
        compile_template(text)


def test_compile_template_refuses_nested_fields_in_a_spec() -> None:
    with pytest.raises(TemplateError, match="nested fields in a format spec"):
        compile_template("{x:{width}}")


@pytest.mark.parametrize("text", ["{x!x}", "{x!q:>3}"])
def test_compile_template_refuses_an_unknown_conversion(text: str) -> None:
    with pytest.raises(TemplateError, match="unknown conversion"):
        compile_template(text)


@pytest.mark.parametrize("text", ["{x", "x}", "{x[}", "{x!}", "{x!rr}"])
def test_compile_template_refuses_a_syntax_error(text: str) -> None:
    with pytest.raises(TemplateError, match="syntax error"):
        compile_template(text)


@pytest.mark.parametrize("text", ["{x..y}", "{x.}", "{x[]}", "{x[a]b}"])
def test_compile_template_refuses_a_malformed_field(text: str) -> None:
    with pytest.raises(TemplateError, match="is malformed"):
        compile_template(text)


@pytest.mark.parametrize(
    "text",
    [
        "{x._secret}",
        "{x.__class__.__init__.__globals__}",
        "{x[_secret]}",
        "{x[0]._secret}",
        "{x.a[__builtins__]}",
    ],
)
def test_compile_template_refuses_underscore_attributes_and_keys(text: str) -> None:
    with pytest.raises(TemplateError, match="start with '_' are refused"):
        compile_template(text)


def test_compile_template_allows_an_underscore_top_level_name() -> None:
    # Only attribute and key lookups can reach interpreter internals.
    assert compile_template("{_x}").fields == frozenset({"_x"})


@pytest.mark.parametrize("value", [5, None, b"{x}", ["{x}"], {"body": "{x}"}])
def test_compile_template_refuses_a_non_string(value: t.Any) -> None:
    with pytest.raises(TemplateError, match="must be a str"):
        compile_template(value)


def test_compile_template_error_quotes_the_template() -> None:
    with pytest.raises(TemplateError, match=r"Template '\{x\._y\}'"):
        compile_template("{x._y}")


def test_compile_template_returns_the_cached_object_for_the_same_text() -> None:
    # Build equal strings at run time, so they are distinct objects.
    first = "".join(["cached {x}", " template"])
    second = "".join(["cached {x} ", "template"])
    assert first is not second

    assert compile_template(first) is compile_template(second)


# -- render -------------------------------------------------------------------


def test_render_fills_fields_from_the_context() -> None:
    template = compile_template("{froggy.id} {froggy.name!r} {d[k]} {s[1]} {n:>4}")

    text = template.render({"froggy": Froggy(), "d": {"k": "v"}, "s": "ab", "n": 5})

    assert text == "7 'Fred' v b    5"


def test_render_returns_a_plain_str() -> None:
    # A payload must not be the shared, cached Template object.
    for text in ("no fields", "one {x}"):
        rendered = compile_template(text).render({"x": 1})
        assert type(rendered) is str


@pytest.mark.parametrize(
    ("text", "context", "cause"),
    [
        ("{missing}", {}, KeyError),
        ("{froggy.nope}", {"froggy": Froggy()}, AttributeError),
        ("{seq[5]}", {"seq": [1]}, IndexError),
        ("{n[0]}", {"n": 5}, TypeError),
        ("{s:d}", {"s": "text"}, ValueError),
    ],
)
def test_render_errors_become_template_errors(
    text: str, context: dict[str, t.Any], cause: type[Exception]
) -> None:
    template = compile_template(text)

    with pytest.raises(TemplateError, match="Cannot render template") as info:
        template.render(context)
    assert isinstance(info.value.__cause__, cause)
    assert text in str(info.value)


class Everything:
    """Attributes a template may name, keywords and non-identifiers included."""

    id = 7
    match = "soft keyword"

    def __init__(self) -> None:
        # Names an attribute assignment cannot spell, or would fold (NFKC).
        vars(self).update(
            {
                "class": "keyword",
                "b-c": "dash",
                "\ufb01eld": "ligature: not NFKC-folded to 'field'",
            }
        )
        self.field = "plain field"
        self.items = {"k": "v", 0: "zero", "'": "quote"}


RENDER_CONTEXT: dict[str, t.Any] = {
    "froggy": Everything(),
    "colour": "pink'\"\\{}",
    "n": 3.14159,
    "seq": ["first", "second"],
    "\u00fc": "umlaut",
    "my-key": "dashed key",
    "'": "a quote as a name",
}
FIELDS = [
    "froggy.id",
    "froggy.match",
    "froggy.class",
    "froggy.b-c",
    "froggy.\ufb01eld",
    "froggy.field",
    "froggy.items[k]",
    "froggy.items[0]",
    "froggy.items[']",
    "colour",
    "n",
    "seq[1]",
    "\u00fc",
    "my-key",
    "'",
]
CONVERSIONS = ["", "!r", "!s", "!a"]
SPECS = ["", ":>12", ":^20", ":'<9", ':"<9', ":\\>5", ":"]
LITERAL_PIECES = [
    "a",
    " ",
    "'",
    '"',
    "\\",
    "\\n",
    "\n",
    "\r",
    "\t",
    "\x00",
    "\u2028",
    "{{",
    "}}",
    "f",
    "é",
    "'''",
    '"""',
    "{{x}}",
]


@st.composite
def templates(draw: st.DrawFn) -> str:
    literal = st.lists(st.sampled_from(LITERAL_PIECES), max_size=6).map("".join)
    parts = [draw(literal)]
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.sampled_from(FIELDS))
        conversion = draw(st.sampled_from(CONVERSIONS))
        spec = draw(st.sampled_from(SPECS))
        parts += ["{" + field + conversion + spec + "}", draw(literal)]
    return "".join(parts)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(templates())
def test_render_agrees_with_str_format_map(text: str) -> None:
    # render() runs the template as compiled Python: it must mean exactly what
    # str.format means, whatever quotes, escapes and names the text holds.
    assert compile_template(text).render(RENDER_CONTEXT) == text.format_map(
        RENDER_CONTEXT
    )


@pytest.mark.parametrize(
    "text",
    [
        "{x[exit('injected')]}",
        "{x.y'); raise SystemExit('injected'); ('}",
        "'; raise SystemExit('injected') #{x}",
        '"""; raise SystemExit("injected") #{x}',
        "\\'; raise SystemExit('injected') #{x}",
        "{x!r:'); raise SystemExit('injected'); ('}",
    ],
)
def test_template_text_never_runs_as_code(text: str) -> None:
    context = {
        "x": {
            "exit('injected')": "looked up, not run",
            "']; raise SystemExit('injected'); x['": "looked up, not run",
        }
    }
    template = compile_template(text)  # SystemExit here or below: it ran
    try:
        expected = text.format_map(context)
    except (KeyError, AttributeError, ValueError) as exc:
        with pytest.raises(TemplateError) as info:
            template.render(context)
        assert type(info.value.__cause__) is type(exc)
    else:
        assert template.render(context) == expected


@pytest.mark.parametrize("duplicate", [pickle_round_trip, copy.copy, copy.deepcopy])
def test_a_template_survives_pickle_and_copy(
    duplicate: t.Callable[[t.Any], t.Any],
) -> None:
    template = compile_template("Froggy {froggy.id}: {colour!r}")

    copied = duplicate(template)

    assert isinstance(copied, Template)
    assert copied == template
    assert copied.fields == template.fields
    assert copied.render({"froggy": Froggy(), "colour": "pink"}) == "Froggy 7: 'pink'"


def test_render_one_line_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError, match="Cannot render template"):
        compile_template("{missing}").render_one_line({})


# -- render_one_line ----------------------------------------------------------


def test_render_one_line_escapes_cr_and_lf_in_values() -> None:
    template = compile_template("user {name} logged in")

    text = template.render_one_line({"name": "eve\r\nINFO forged line\nend"})

    assert text == "user eve\\r\\nINFO forged line\\nend logged in"
    assert "\n" not in text and "\r" not in text


def test_render_one_line_keeps_the_templates_own_line_breaks() -> None:
    template = compile_template("first {a}\nsecond {b}\r\nthird")

    assert (
        template.render_one_line({"a": "x", "b": "y"}) == "first x\nsecond y\r\nthird"
    )


def test_render_one_line_escapes_values_but_keeps_template_line_breaks() -> None:
    template = compile_template("first {a}\nsecond {b}")

    text = template.render_one_line({"a": "x\ny", "b": "z"})

    assert text == "first x\\ny\nsecond z"


def test_render_one_line_applies_conversions_and_specs_when_escaping() -> None:
    template = compile_template("{{ {a!s:>5} {b[k]} {c.name} }}")

    class C:
        name = "n\rm"

    text = template.render_one_line({"a": "p\nq", "b": {"k": "\n"}, "c": C()})

    # The spec pads the value, then its line break is escaped.
    assert text == "{   p\\nq \\n n\\rm }"


# -- compile_templates --------------------------------------------------------


def test_compile_templates_compiles_a_str() -> None:
    compiled = compile_templates("hello {who}", "@deferred_notify log=")

    assert isinstance(compiled, Template)
    assert compiled.fields == frozenset({"who"})


def test_compile_templates_compiles_the_str_values_of_a_dict() -> None:
    compiled = compile_templates(
        {"subject": "Saved {item.id}", "body": "By {user}"}, "@deferred_notify mail="
    )

    assert isinstance(compiled["subject"], Template)
    assert isinstance(compiled["body"], Template)
    assert template_fields(compiled) == frozenset({"item", "user"})


@pytest.mark.parametrize("recipients", [["a@example.com"], ("a@example.com",)])
def test_compile_templates_compiles_each_entry_of_a_list_into_a_list(
    recipients: t.Any,
) -> None:
    compiled = compile_templates(
        {"subject": "s", "body": "b", "recipients": recipients}, "mail="
    )

    assert type(compiled["recipients"]) is list
    assert compiled["recipients"] == ["a@example.com"]
    assert isinstance(compiled["recipients"][0], Template)


def test_template_fields_count_the_fields_of_list_entries() -> None:
    compiled = compile_templates(
        {
            "subject": "Welcome {user.name}",
            "body": "b",
            "recipients": ["{email}", "{manager.email}", "ops@example.com"],
        },
        "mail=",
    )

    assert [entry.fields for entry in compiled["recipients"]] == [
        frozenset({"email"}),
        frozenset({"manager"}),
        frozenset(),
    ]
    assert template_fields(compiled) == frozenset({"user", "email", "manager"})


def test_compile_templates_checks_list_entries_naming_the_entry() -> None:
    with pytest.raises(
        TemplateError, match=r"^mail=\['recipients'\]\[1\]: .*syntax error"
    ):
        compile_templates(
            {"subject": "s", "body": "b", "recipients": ["a@example.com", "{email"]},
            "mail=",
        )
    with pytest.raises(TemplateError, match=r"mail=\['recipients'\]\[0\]: .*'_'"):
        compile_templates(
            {"subject": "s", "body": "b", "recipients": ["{user._email}"]}, "mail="
        )


@pytest.mark.parametrize("value", [5, None, ["ok", 5], {"nested": "dict"}])
def test_compile_templates_refuses_other_dict_values_naming_the_key(
    value: t.Any,
) -> None:
    with pytest.raises(
        TemplateError, match=r"mail=\['body'\] must be a str template or a list"
    ):
        compile_templates({"subject": "s", "body": value}, "mail=")


def test_compile_templates_refuses_a_non_string_key() -> None:
    with pytest.raises(TemplateError, match="keys must be strings"):
        compile_templates({1: "s"}, "mail=")


@pytest.mark.parametrize("value", [5, None, ["{x}"], Raw("{x}"), object()])
def test_compile_templates_keeps_a_value_that_is_neither_str_nor_dict(
    value: t.Any,
) -> None:
    assert compile_templates(value, "custom=") is value


def test_compile_templates_keeps_a_template_name_as_a_plain_str() -> None:
    compiled = compile_templates(
        {"subject": "Hi {user.name}", "template": "email/{confirm}"}, "mail="
    )

    assert type(compiled["template"]) is str
    assert compiled["template"] == "email/{confirm}"
    assert template_fields(compiled) == frozenset({"user"})


@pytest.mark.parametrize("name", ["", 5, None, ["email/confirm"]])
def test_compile_templates_refuses_a_template_name_that_is_not_a_non_empty_str(
    name: t.Any,
) -> None:
    with pytest.raises(
        TemplateError, match=r"^mail=\['template'\] must be a template's name"
    ):
        compile_templates({"subject": "s", "template": name}, "mail=")


@pytest.mark.parametrize(
    ("path", "root"), [("files", "files"), ("result.files", "result")]
)
def test_an_attachments_path_is_kept_and_counts_its_first_name(
    path: str, root: str
) -> None:
    compiled = compile_templates({"subject": "s", "attachments": path}, "mail=")

    assert type(compiled["attachments"]) is str
    assert compiled["attachments"] == path
    assert template_fields(compiled) == frozenset({root})


@pytest.mark.parametrize(
    "path",
    ["", 5, "result._files", "files[__x]", "files[0]", "{files}", "a b", "0", ".x"],
)
def test_an_attachments_path_is_checked_like_a_template_field(path: t.Any) -> None:
    with pytest.raises(TemplateError, match=r"^mail=\['attachments'\]"):
        compile_templates({"subject": "s", "attachments": path}, "mail=")


@pytest.mark.parametrize(
    ("value", "every"),
    [
        ("{x}", False),
        ({"subject": "{x}", "body": "b", "recipients": ["{y}"]}, False),
        ({"subject": "s", "body": "b", "attachments": "files"}, False),
        (Raw("{x}"), False),
        ({"subject": "s", "template": "email/confirm"}, True),
        (["a custom", "template"], True),
        (object(), True),
    ],
)
def test_only_a_template_name_or_a_custom_template_reads_every_field(
    value: t.Any, every: bool
) -> None:
    assert reads_every_field(compile_templates(value, "t=")) is every


def test_compile_templates_errors_name_where_the_template_is() -> None:
    with pytest.raises(TemplateError, match=r"^mail=\['subject'\]: Template"):
        compile_templates({"subject": "{x", "body": "b"}, "mail=")


def test_raw_log_payload_is_queued_as_it_is(app, ctx):
    intent = enqueue("log", Raw("p {color: red} {user.id}"))
    assert intent.payload == "p {color: red} {user.id}"


def test_raw_payload_of_the_wrong_type_is_refused_at_queue_time(app, ctx):
    with pytest.raises(TemplateError, match=r"takes a str payload, got int 42"):
        enqueue("log", Raw(42))


def _outcome(render: t.Callable[[], t.Any]) -> tuple[t.Any, ...]:
    try:
        return ("rendered", render())
    except TemplateError as exc:
        return ("refused", str(exc), type(exc.__cause__))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    templates(),
    st.sampled_from(["", "\n", "\r\n", "x"]),
    st.sampled_from(["full", "empty"]),
)
def test_a_channels_renderer_agrees_with_its_render(
    text: str, line_break: str, which: str
) -> None:
    # The wrapper's fast path renders with Channel._renderer(template), worked
    # out once per app; the general path calls Channel.render each time.
    from notifyqueue import Channel
    from notifyqueue.channels.log import LogChannel

    context = (
        dict(RENDER_CONTEXT, colour=f"pink{line_break}green") if which == "full" else {}
    )
    template = compile_template(text)
    for channel in (Channel("base"), LogChannel("log")):
        general = _outcome(functools.partial(channel.render, template, context))
        fast = _outcome(functools.partial(channel._renderer(template), context))
        assert fast == general


def test_a_channel_that_overrides_render_renders_through_it() -> None:
    from .helpers import RecordingChannel

    channel = RecordingChannel("rec")
    template = compile_template("{colour}")

    assert channel._renderer(template)({"colour": "pink"}) == "pink"
    assert channel.templates == [template]
