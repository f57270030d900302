"""A renderer for the small subset of Go's text/template that our Ollama templates use.

Supported: literal text; printing `.Field`, `$.Field`, `$var`, a string literal, `currentDate` or
`slice X I J`; `{{ range .Messages }}...{{ end }}`; `{{ if COND }}...{{ else if COND }}...{{ else }}...{{ end }}`
where COND is `eq VALUE "x"`, a value, or `not` one of those; variables `{{ $v := EXPR }}` and
`{{ $v = EXPR }}` where EXPR is `true`, `false`, a string literal, a value, `currentDate` or `slice`.
Variables follow Go's scoping (text/template/exec.go): a declaration lives until the `end` of the block it
is in, and an assignment changes the innermost declared variable, also from inside a range (Go >= 1.11).
`currentDate` is Ollama's template function (ollama/ollama template/template.go), the server's date as
YYYY-MM-DD; `render` takes that date as an argument so that checks can run at other dates. Anything else
is an error, so a template that Ollama would read differently cannot pass silently.
"""

import datetime
import re
from typing import Any

ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
ASSIGN = re.compile(r"\$(\w+)\s*(:?=)\s*(.+)", re.DOTALL)
VALUE = re.compile(r"\$?\.\w+|\$\w+")
STRING = re.compile(r'"([^"\\]*)"')
SLICE = re.compile(r"slice (\$?\.\w+|\$\w+) (\d+) (\d+)")


class TemplateError(ValueError):
    pass


def tokenize(template: str) -> list[tuple[str, str]]:
    """("text", literal) and ("action", inner) pieces; trim markers are refused (we never emit them)."""
    pieces, position = [], 0
    for match in ACTION.finditer(template):
        if match.group(0).startswith("{{-") or match.group(0).endswith("-}}"):
            raise TemplateError(f"trim markers are not supported: {match.group(0)}")
        pieces.append(("text", template[position : match.start()]))
        pieces.append(("action", match.group(1)))
        position = match.end()
    pieces.append(("text", template[position:]))
    return [piece for piece in pieces if piece != ("text", "")]


def parse(pieces: list[tuple[str, str]], position: int, stop: tuple[str, ...]) -> tuple[list[Any], int]:
    """A node list up to one of the `stop` actions; returns the nodes and the index of that action."""
    nodes: list[Any] = []
    while position < len(pieces):
        kind, value = pieces[position]
        if kind == "text":
            nodes.append(("text", value))
        elif value == "end" or value.startswith("else"):
            if value.split(" ")[0] not in stop:
                raise TemplateError(f"unexpected {{{{ {value} }}}}")
            return nodes, position
        elif value.startswith("range "):
            body, position = parse(pieces, position + 1, ("end",))
            nodes.append(("range", value.removeprefix("range ").strip(), body))
        elif value.startswith("if "):
            position, node = parse_if(pieces, position, value.removeprefix("if ").strip())
            nodes.append(node)
        elif assignment := ASSIGN.fullmatch(value):
            name, operator, expression = assignment.groups()
            nodes.append(("set", name, operator == ":=", expression.strip()))
        else:
            nodes.append(("value", value))
        position += 1
    if stop:
        raise TemplateError(f"missing {{{{ {stop[0]} }}}}")
    return nodes, position


def parse_if(pieces: list[tuple[str, str]], position: int, condition: str) -> tuple[int, Any]:
    branches = []
    while True:
        body, position = parse(pieces, position + 1, ("end", "else"))
        branches.append((condition, body))
        action = pieces[position][1]
        if action == "end":
            return position, ("if", branches)
        condition = action.removeprefix("else").strip().removeprefix("if").strip() or "true"


class Scope:
    """The data (`$`), the server's date, and a stack of variable frames, one per open block."""

    def __init__(self, root: dict[str, Any], today: datetime.date) -> None:
        self.root, self.today = root, today
        self.frames: list[dict[str, Any]] = [{}]

    def value(self, expression: str, dot: dict[str, Any]) -> Any:
        if expression.startswith("$."):
            return self.lookup(self.root, expression[2:])
        if expression.startswith("$"):
            return self.frame_of(expression[1:])[expression[1:]]
        return self.lookup(dot, expression[1:])

    def frame_of(self, name: str) -> dict[str, Any]:
        for frame in reversed(self.frames):
            if name in frame:
                return frame
        raise TemplateError(f"undefined variable ${name}")

    @staticmethod
    def lookup(data: dict[str, Any], name: str) -> Any:
        if name not in data:
            raise TemplateError(f"no field .{name} here")
        return data[name]

    def evaluate(self, expression: str, dot: dict[str, Any]) -> Any:
        """A value, `true`/`false`, a string literal, `currentDate`, or `slice X I J` (Go's builtin)."""
        if expression in ("true", "false"):
            return expression == "true"
        if literal := STRING.fullmatch(expression):
            return literal.group(1)
        if expression == "currentDate":
            return self.today.strftime("%Y-%m-%d")  # Ollama: time.Now().Format("2006-01-02")
        if sliced := SLICE.fullmatch(expression):
            text, start, end = self.value(sliced.group(1), dot), int(sliced.group(2)), int(sliced.group(3))
            if not isinstance(text, str) or not 0 <= start <= end <= len(text):
                raise TemplateError(f"slice out of range: {expression}")
            return text[start:end]
        if VALUE.fullmatch(expression):
            return self.value(expression, dot)
        raise TemplateError(f"unsupported action {{{{ {expression} }}}}")

    def assign(self, name: str, declare: bool, expression: str, dot: dict[str, Any]) -> None:
        frame = self.frames[-1] if declare else self.frame_of(name)
        frame[name] = self.evaluate(expression, dot)

    def truth(self, condition: str, dot: dict[str, Any]) -> bool:
        if condition == "true":
            return True
        if condition.startswith("not "):
            return not self.truth(condition[4:].strip(), dot)
        equal = re.fullmatch(r'eq (\S+) "([^"]*)"', condition)
        if equal and VALUE.fullmatch(equal.group(1)):
            return self.value(equal.group(1), dot) == equal.group(2)
        if VALUE.fullmatch(condition):
            return bool(self.value(condition, dot))
        raise TemplateError(f"unsupported condition {condition!r}")

    def block(self, nodes: list[Any], dot: dict[str, Any]) -> str:
        """A block's body in a fresh frame: what it declares ends at its `end`, as in Go."""
        self.frames.append({})
        try:
            return execute(nodes, dot, self)
        finally:
            self.frames.pop()


def printed(value: Any) -> str:
    """How Go's text/template prints the values our templates have (fmt.Print): bools in lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    raise TemplateError(f"cannot print {type(value).__name__} values")


def execute(nodes: list[Any], dot: dict[str, Any], scope: Scope) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(printed(scope.evaluate(node[1], dot)))
        elif node[0] == "set":
            scope.assign(node[1], node[2], node[3], dot)
        elif node[0] == "range":
            for item in scope.value(node[1], dot):
                out.append(scope.block(node[2], item))
        else:
            for condition, body in node[1]:
                if scope.truth(condition, dot):
                    out.append(scope.block(body, dot))
                    break
    return "".join(out)


def render(template: str, variables: dict[str, Any], today: datetime.date | None = None) -> str:
    """`template` executed on `variables`, with `currentDate` giving `today` (default: this machine's date,
    as Ollama's server uses its own)."""
    nodes, _ = parse(tokenize(template), 0, ())
    return execute(nodes, variables, Scope(variables, today or datetime.date.today()))
