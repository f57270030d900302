"""A renderer for the small subset of Go's text/template that our Ollama templates use.

Supported: literal text; `{{ .Field }}` and `{{ $.Field }}`; `{{ range .Messages }}...{{ end }}`;
`{{ if COND }}...{{ else if COND }}...{{ else }}...{{ end }}` where COND is `eq .Field "x"`, `.Field`,
`$.Field`, `$var` or `not` one of those; boolean variables `{{ $var := true }}` and `{{ $var = false }}`
(assignment inside a range changes the outer variable, as in Go since 1.11). Anything else is an error,
so a template that Ollama would read differently cannot pass silently.
"""

import re
from typing import Any

ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
ASSIGN = re.compile(r"\$(\w+)\s*:?=\s*(true|false)")
VALUE = re.compile(r"\$?\.\w+|\$\w+")


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
        elif ASSIGN.fullmatch(value):
            name, literal = ASSIGN.fullmatch(value).groups()  # type: ignore[union-attr]
            nodes.append(("set", name, literal == "true"))
        elif VALUE.fullmatch(value):
            nodes.append(("value", value))
        else:
            raise TemplateError(f"unsupported action {{{{ {value} }}}}")
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
    def __init__(self, root: dict[str, Any]) -> None:
        self.root, self.variables = root, {}

    def value(self, expression: str, dot: dict[str, Any]) -> Any:
        if expression.startswith("$."):
            return self.lookup(self.root, expression[2:])
        if expression.startswith("$"):
            if expression[1:] not in self.variables:
                raise TemplateError(f"undefined variable {expression}")
            return self.variables[expression[1:]]
        return self.lookup(dot, expression[1:])

    @staticmethod
    def lookup(data: dict[str, Any], name: str) -> Any:
        if name not in data:
            raise TemplateError(f"no field .{name} here")
        return data[name]

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


def execute(nodes: list[Any], dot: dict[str, Any], scope: Scope) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(scope.value(node[1], dot)))
        elif node[0] == "set":
            scope.variables[node[1]] = node[2]
        elif node[0] == "range":
            for item in scope.value(node[1], dot):
                out.append(execute(node[2], item, scope))
        else:
            for condition, body in node[1]:
                if scope.truth(condition, dot):
                    out.append(execute(body, dot, scope))
                    break
    return "".join(out)


def render(template: str, variables: dict[str, Any]) -> str:
    nodes, _ = parse(tokenize(template), 0, ())
    return execute(nodes, variables, Scope(variables))
