"""Build the demo data set from real function signatures of the Python standard library.

Task: given a signature as the documentation shows it, answer with JSON naming its module, function,
required parameters and optional ones (those with defaults, *args and **kwargs). The signatures are read
with `inspect` from the standard library of the running Python (the committed file was made with
CPython 3.11); the text is the Python Software Foundation's, under the PSF License Version 2.

    python examples/data/make_stdlib_signatures.py > examples/data/stdlib_signatures.jsonl
"""

import importlib
import inspect
import json
import random
import sys
import warnings

MODULES = (
    "argparse base64 bisect calendar collections configparser contextlib copy csv dataclasses "
    "datetime difflib email.utils enum filecmp fileinput fnmatch fractions ftplib functools getpass "
    "gettext glob gzip heapq hmac html http.client http.cookies imaplib inspect ipaddress json "
    "logging lzma mailbox mimetypes netrc ntpath operator optparse os.path pathlib pickle pkgutil "
    "platform plistlib poplib pprint queue quopri random re reprlib sched secrets selectors shlex "
    "shutil smtplib socketserver statistics string struct subprocess tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback typing unittest urllib.parse urllib.request uuid "
    "warnings weakref webbrowser wsgiref.util xml.dom.minidom xml.etree.ElementTree zipfile"
).split()
EXAMPLES = 420
MAX_SIGNATURE_CHARS = 110
SEED = 20261123
INSTRUCTION = "Describe this Python function signature as JSON."


def default_text(value: object) -> str:
    """The default as documentation shows it; never an address-bearing repr like <function f at 0x...>."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str | bytes) and len(value) <= 16:
        return repr(value)
    return getattr(value, "__name__", "...")


def describe(module: str, qualname: str, signature: inspect.Signature) -> tuple[str, dict] | None:
    parts, required, optional = [], [], []
    params = list(signature.parameters.values())
    if "." in qualname and params and params[0].name in ("self", "cls"):
        params = params[1:]
    if not params:
        return None
    star_written = False
    for index, param in enumerate(params):
        if param.kind is param.VAR_POSITIONAL:
            parts.append(f"*{param.name}")
            optional.append(f"*{param.name}")
            star_written = True
            continue
        if param.kind is param.VAR_KEYWORD:
            parts.append(f"**{param.name}")
            optional.append(f"**{param.name}")
            continue
        if param.kind is param.KEYWORD_ONLY and not star_written:
            parts.append("*")
            star_written = True
        if param.default is param.empty:
            parts.append(param.name)
            required.append(param.name)
        else:
            parts.append(f"{param.name}={default_text(param.default)}")
            optional.append(param.name)
        following = params[index + 1] if index + 1 < len(params) else None
        if param.kind is param.POSITIONAL_ONLY and (
            following is None or following.kind is not param.POSITIONAL_ONLY
        ):
            parts.append("/")
    text = f"{module}.{qualname}({', '.join(parts)})"
    answer = {"module": module, "function": qualname, "required": required, "optional": optional}
    return text, answer


def public_callables(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    found = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    found.append((f"{name}.{method_name}", method))
    return found


def main() -> None:
    warnings.simplefilter("ignore")
    candidates = {}
    for module_name in MODULES:
        for qualname, obj in public_callables(module_name):
            try:
                described = describe(module_name, qualname, inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            if described and len(described[0]) <= MAX_SIGNATURE_CHARS:
                candidates.setdefault(described[0], described[1])
    chosen = random.Random(SEED).sample(sorted(candidates), EXAMPLES)
    for text in chosen:
        record = {"instruction": INSTRUCTION, "input": text, "output": json.dumps(candidates[text])}
        sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
