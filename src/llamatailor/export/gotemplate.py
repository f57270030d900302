"""A renderer for the small subset of Go's text/template that our Ollama templates use.

Supported: literal text, `{{ .Field }}`, `{{ range .Messages }}...{{ end }}`,
`{{ if eq .Role "x" }}...{{ else if eq .Role "y" }}...{{ end }}`, `{{ if not .System }}...{{ end }}`.
Anything else is an error, so a template that Ollama would read differently cannot pass silently.
"""

import re
from typing import Any

ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)


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
            if value.split(" ")[0] not in stop and value not in stop:
                raise TemplateError(f"unexpected {{{{ {value} }}}}")
            return nodes, position
        elif value.startswith("range "):
            body, position = parse(pieces, position + 1, ("end",))
            nodes.append(("range", value.removeprefix("range ").strip(), body))
        elif value.startswith("if "):
            position, node = parse_if(pieces, position, value.removeprefix("if ").strip())
            nodes.append(node)
        elif re.fullmatch(r"\.\w+", value):
            nodes.append(("field", value[1:]))
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


def truth(condition: str, scope: dict[str, Any]) -> bool:
    if condition == "true":
        return True
    negated = re.fullmatch(r"not \.(\w+)", condition)
    if negated:
        return not scope.get(negated.group(1))
    equal = re.fullmatch(r'eq \.(\w+) "([^"]*)"', condition)
    if equal:
        return scope.get(equal.group(1)) == equal.group(2)
    raise TemplateError(f"unsupported condition {condition!r}")


def execute(nodes: list[Any], scope: dict[str, Any], root: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            if node[1] not in scope:
                raise TemplateError(f"no field .{node[1]} here")
            out.append(str(scope[node[1]]))
        elif node[0] == "range":
            for item in root[node[1].removeprefix(".")]:
                out.append(execute(node[2], item, root))
        else:
            for condition, body in node[1]:
                if truth(condition, scope):
                    out.append(execute(body, scope, root))
                    break
    return "".join(out)


def render(template: str, variables: dict[str, Any]) -> str:
    nodes, _ = parse(tokenize(template), 0, ())
    return execute(nodes, variables, variables)
