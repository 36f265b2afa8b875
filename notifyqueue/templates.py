"""Format-string templates: checked once when compiled, rendered cheaply after."""

from __future__ import annotations

import functools
import keyword
import re
import string
import typing as t
from _string import formatter_field_name_split  # type: ignore[import-not-found]

from markupsafe import Markup, escape

from .errors import TemplateError

_formatter = string.Formatter()
_CONVERSIONS = (None, "r", "s", "a")


class Template(str):
    """A ``str.format`` template whose fields were checked when it was made.

    It is a ``str``, so a channel that wants the raw text has it. :meth:`render`
    has ``str.format`` semantics, and is safe because :func:`compile_template`
    refused every ``_``-prefixed attribute or key.
    """

    fields: frozenset[str]
    """The top-level names the template reads from its context."""

    _parsed: list[tuple[str, str | None, str | None, str | None]]
    _line_breaks: int
    _fill: t.Callable[[t.Mapping[str, t.Any]], str]

    def render(self, context: t.Mapping[str, t.Any]) -> str:
        """Fill the template from ``context``.

        :raises TemplateError: if a field has no value or cannot be formatted.
        """
        return self._fill(context)

    def __reduce__(self) -> tuple[t.Any, ...]:
        # Compiled again on unpickling: the generated function cannot travel.
        return (compile_template, (str(self),))

    def render_one_line(self, context: t.Mapping[str, t.Any]) -> str:
        """Like :meth:`render`, but CR and LF inside values become ``\\r``/``\\n``.

        Literal line breaks in the template itself are kept.
        """
        text = self._fill(context)
        # Fast path: no value brought a line break, so nothing needs escaping.
        if text.count("\n") + text.count("\r") == self._line_breaks:
            return text
        return self._render_each(context, _one_line)

    def render_html(self, context: t.Mapping[str, t.Any]) -> str:
        """Like :meth:`render`, but each value is HTML-escaped (for an HTML part).

        Each field's formatted value goes through :func:`markupsafe.escape`,
        unless the value (after any ``!r``/``!s``/``!a`` conversion) is
        already :class:`markupsafe.Markup`. The template's own text is HTML
        and is kept as written.

        :raises TemplateError: if a field has no value or cannot be formatted.
        """
        if not self.fields:
            return self.render(context)
        return self._render_each(context, _html)

    def _render_each(
        self, context: t.Mapping[str, t.Any], finish: t.Callable[[t.Any, str], str]
    ) -> str:
        """Render field by field; ``finish(value, formatted)`` gives each one's text."""
        parts = []
        try:
            for literal, field_name, spec, conversion in self._parsed:
                parts.append(literal)
                if field_name is not None:
                    value, _ = _formatter.get_field(field_name, (), context)
                    value = _formatter.convert_field(value, conversion)
                    parts.append(finish(value, format(value, spec or "")))
        except _RENDER_ERRORS as exc:
            raise self._render_error(exc) from exc
        return "".join(parts)

    def _render_error(self, exc: Exception) -> TemplateError:
        return TemplateError(
            f"Cannot render template {str(self)!r}: {type(exc).__name__}: {exc}."
            " Check that the context has every field the template names."
        )


_RENDER_ERRORS = (KeyError, AttributeError, IndexError, TypeError, ValueError)


def _one_line(value: t.Any, formatted: str) -> str:
    return formatted.replace("\r", "\\r").replace("\n", "\\n")


def _html(value: t.Any, formatted: str) -> str:
    return formatted if isinstance(value, Markup) else str(escape(formatted))


class Raw:
    """A payload queued as it is: final text, never formatted or escaped.

    ``enqueue("mail", Raw({"subject": s, "body": text, "html": html}))`` queues
    what an app's own ``send_email(subject, text, html)`` already rendered;
    ``enqueue("log", Raw("p {color: red}"))`` logs those braces literally.
    The channel still checks it (header values, addresses) at queue time.

    :param value: the payload, in the shape the channel's templates have.
    """

    __slots__ = ("value",)

    def __init__(self, value: t.Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Raw({self.value!r})"


def compile_template(text: str) -> Template:
    """Check ``text`` and return it as a :class:`Template`.

    Refused: syntax errors, positional fields (``{}``, ``{0}``), attributes or
    keys that start with ``_`` (they reach interpreter internals such as
    ``{obj.__class__.__init__.__globals__}``), nested fields in a format spec,
    and unknown conversions.

    :raises TemplateError: naming the template and the problem.
    """
    if not isinstance(text, str):
        raise TemplateError(
            f"A template must be a str, got {type(text).__name__} {text!r}."
        )
    return _compile_template(text)


@functools.lru_cache(maxsize=512)
def _compile_template(text: str) -> Template:
    try:
        parsed = list(_formatter.parse(text))
    except ValueError as exc:
        raise TemplateError(f"Template {text!r} has a syntax error: {exc}.") from exc
    fields = set()
    line_breaks = 0
    for literal, field_name, spec, conversion in parsed:
        line_breaks += literal.count("\n") + literal.count("\r")
        if field_name is None:
            continue
        fields.add(_check_field(text, field_name))
        if spec and "{" in spec:
            raise TemplateError(
                f"Template {text!r}: nested fields in a format spec ({spec!r})"
                " are not supported; write the spec literally."
            )
        if conversion not in _CONVERSIONS:
            raise TemplateError(
                f"Template {text!r}: unknown conversion '!{conversion}';"
                " use !r, !s or !a."
            )
    template = Template(text)
    template._fill = _filler(parsed, template._render_error)
    template.fields = frozenset(fields)
    template._parsed = parsed
    template._line_breaks = line_breaks
    return template


def _filler(
    parsed: list[tuple[str, str | None, str | None, str | None]],
    error: t.Callable[[Exception], TemplateError],
) -> t.Callable[[t.Mapping[str, t.Any]], str]:
    """Turn a checked template into a function that fills it with one f-string.

    It is the whole of :meth:`Template.render`, errors included (``error``
    makes the :class:`TemplateError`), so that a channel's renderer calls
    one function.

    Profiling B1 (benchmarks/) showed ``str.format_map`` re-parsing the
    template and walking each field name on every call: 0.65 µs for two fields,
    the largest single cost of queueing an intent. The f-string does the same
    look-ups, conversions and format specs in byte code, in half the time.
    Only checked names reach the source: ASCII identifiers as attributes,
    everything else as ``repr()`` literals.
    """
    lines = ["def fill(c, /):", "  try:"]
    parts = []
    for number, (literal, field_name, spec, conversion) in enumerate(parsed):
        if literal:
            parts.append("f" + repr(literal).replace("{", "{{").replace("}", "}}"))
        if field_name is None:
            continue
        first, rest = formatter_field_name_split(field_name)
        expression = f"c[{first!r}]"
        for is_attribute, key in rest:
            if not is_attribute:
                expression += f"[{key!r}]"
            elif key.isascii() and key.isidentifier() and not keyword.iskeyword(key):
                expression += f".{key}"
            else:
                expression = f"getattr({expression}, {key!r})"
        lines.append(f"    v{number} = {expression}")
        field = f"v{number}" + (f"!{conversion}" if conversion else "")
        if spec:
            lines.append(f"    s{number} = {spec!r}")
            field += f":{{s{number}}}"
        parts.append("f'{" + field + "}'")
    lines.append(f"    return {' '.join(parts) or repr('')}")
    lines += ["  except _ERRORS as exc:", "    raise _error(exc) from exc"]
    namespace: dict[str, t.Any] = {"_ERRORS": _RENDER_ERRORS, "_error": error}
    exec(compile("\n".join(lines), "<notifyqueue template>", "exec"), namespace)
    return t.cast("t.Callable[[t.Mapping[str, t.Any]], str]", namespace["fill"])


def _check_field(text: str, field_name: str) -> str:
    """Return the top-level name of ``field_name``, or raise if it is unsafe."""
    try:
        first, rest = formatter_field_name_split(field_name)
        lookups = list(rest)
    except ValueError as exc:
        raise TemplateError(
            f"Template {text!r}: field {{{field_name}}} is malformed: {exc}."
        ) from exc
    if isinstance(first, int) or first == "":
        raise TemplateError(
            f"Template {text!r}: positional field {{{field_name}}} is not supported;"
            " name a parameter, for example {froggy.id}."
        )
    for _is_attribute, key in lookups:
        if isinstance(key, str) and key.startswith("_"):
            raise TemplateError(
                f"Template {text!r}: field {{{field_name}}} reads {key!r};"
                " attributes and keys that start with '_' are refused."
            )
    return str(first)


# Keys of a dict template kept as plain strings, never formatted: a Jinja
# template's name, and the field path of a mail's attachments.
_NAME_KEY = "template"
_PATH_KEY = "attachments"


def compile_templates(value: t.Any, where: str) -> t.Any:
    """Compile a channel template given to a decorator.

    A ``str`` becomes a :class:`Template`. A dict (the mail channel's shape)
    gets each ``str`` value compiled, and each entry of a list value (such as
    ``recipients``): a list must hold only strings, and becomes a list of
    templates. Two keys of a dict stay plain strings: ``"template"``, a
    template's name for a channel that renders it with the call's whole
    context (Jinja), and ``"attachments"``, the path of a field that holds
    them (``"files"``, ``"result.files"``), checked like a template's field.
    Any other value, neither ``str`` nor dict (a :class:`Raw`, a custom
    channel's own template object), is kept as it is.

    :param where: names the template in error messages.
    """
    if isinstance(value, str):
        return _compile_in(value, where)
    if isinstance(value, t.Mapping):
        compiled: dict[str, t.Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TemplateError(f"{where}: keys must be strings, got {key!r}.")
            if key == _NAME_KEY:
                if not isinstance(item, str) or not item:
                    raise TemplateError(
                        f"{where}[{key!r}] must be a template's name, a non-empty"
                        f" str such as 'email/confirm', got {item!r}."
                    )
                compiled[key] = item
            elif key == _PATH_KEY:
                _field_path_root(item, f"{where}[{key!r}]")
                compiled[key] = item
            elif isinstance(item, str):
                compiled[key] = _compile_in(item, f"{where}[{key!r}]")
            elif isinstance(item, (list, tuple)) and all(
                isinstance(entry, str) for entry in item
            ):
                compiled[key] = [
                    _compile_in(entry, f"{where}[{key!r}][{number}]")
                    for number, entry in enumerate(item)
                ]
            else:
                raise TemplateError(
                    f"{where}[{key!r}] must be a str template or a list of strings,"
                    f" got {type(item).__name__} {item!r}."
                )
        return compiled
    return value


def template_fields(value: t.Any) -> frozenset[str]:
    """Return the top-level field names a compiled template reads.

    An ``"attachments"`` path counts its first name. See
    :func:`reads_every_field` for templates that read the whole context.
    """
    if isinstance(value, Template):
        return value.fields
    if isinstance(value, dict):
        fields: set[str] = set()
        for key, item in value.items():
            if isinstance(item, Template):
                fields |= item.fields
            elif isinstance(item, list):
                fields.update(*(entry.fields for entry in item))
            elif key == _PATH_KEY:
                fields.add(_field_path_root(item, key))
        return frozenset(fields)
    return frozenset()


def reads_every_field(value: t.Any) -> bool:
    """Whether a compiled template may read any parameter of the call.

    True for a dict naming a ``"template"`` (a Jinja template reads what it
    likes) and for a template object that is neither ``str``, dict nor
    :class:`Raw` (a custom channel's own): its channel is given every
    parameter (defaults applied) and ``result``. A call whose templates are
    all ``str.format`` strings gets only the fields they name.
    """
    if isinstance(value, (str, Raw)):
        return False
    if isinstance(value, dict):
        return _NAME_KEY in value
    return True


# A field path in a dict template (the mail channel's "attachments"): a name,
# then attributes, none starting with "_" ("files", "result.files").
_FIELD_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z]\w*)*\Z", re.ASCII)


def is_field_path(value: t.Any) -> bool:
    """Whether ``value`` is a field path such as ``"files"`` or ``"result.files"``."""
    return isinstance(value, str) and _FIELD_PATH.match(value) is not None


def _field_path_root(path: t.Any, where: str) -> str:
    """Check a field path (``"files"``, ``"result.files"``); return its first name."""
    if not is_field_path(path):
        raise TemplateError(
            f"{where} must name a parameter, or an attribute of one or of the"
            " result, such as 'files' or 'result.files' (attributes that start"
            f" with '_' are refused); got {path!r}."
        )
    return str(path).partition(".")[0]


def _compile_in(text: str, where: str) -> Template:
    try:
        return compile_template(text)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}") from exc
