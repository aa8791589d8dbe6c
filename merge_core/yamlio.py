"""Reading YAML written by users (run configs, recipes): PyYAML's safe loader, made strict about two hostile inputs.

* A key given twice in one mapping is refused, naming the key and both lines (PyYAML silently keeps the last).
* Aliases may not expand the document past ``MAX_NODES`` values ("billion laughs": ten nested aliases of ten make
  10**9 values out of a few hundred bytes; PyYAML builds them as shared objects in no time, but anything walking the
  result -- validation, dumping, hashing -- then runs for hours in gigabytes). The expanded size is counted on the
  composed node graph, each distinct node once, so the check itself is linear in the file; recursive aliases
  (``&a [*a]``) are refused too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from merge_core.errors import EvomergeError

MAX_NODES = 200_000  # with aliases; the demo config has ~100 values, a search recipe for 80 layers x 8 sources ~20,000


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (with their lines); `where` names the file in errors."""

    def __init__(self, stream: str, where: str = "yaml") -> None:
        super().__init__(stream)
        self.where = where
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):  # literal keys only: keys merged in with `<<` may be overridden
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise EvomergeError(
                        f"{self.where}: duplicate key {key!r} (line {first} and line {line}); "
                        "remove one (YAML would silently keep the last)"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: Node, limit: int = MAX_NODES) -> int:
    """How many nodes the document has once every alias is expanded (counting stops past `limit`)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise EvomergeError("a recursive alias (an anchor used inside itself)")
        if isinstance(node, ScalarNode):
            return 1
        on_path.add(key)
        children = node.value if isinstance(node, SequenceNode) else [x for pair in node.value for x in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        on_path.discard(key)
        sizes[key] = total
        return total

    return size(root)


def load_yaml(text: str, where: str) -> Any:
    """The YAML document in `text` (a user's file): one-line EvomergeError naming `where` for anything hostile."""
    loader = StrictLoader(text, where)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if loader.aliases:  # without aliases the document is as big as the text: nothing to expand
            try:
                n = expanded_size(root)
            except EvomergeError as e:
                raise EvomergeError(f"{where}: {e}; write the values out instead") from None
            if n > MAX_NODES:
                raise EvomergeError(
                    f"{where}: aliases expand the document past {MAX_NODES} values (a YAML alias "
                    "bomb?); write the values out instead of nesting aliases"
                )
        return loader.construct_document(root)
    except yaml.YAMLError as e:
        raise EvomergeError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise EvomergeError(f"{where}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def read_text(path: str | Path, what: str = "file") -> str:
    """A user's text file as str: one-line errors for a missing, unreadable or non-UTF-8 (binary) file."""
    p = Path(path)
    if not p.is_file():
        raise EvomergeError(f"{p}: {what} not found" if not p.exists() else f"{p}: is not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise EvomergeError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvomergeError(
            f"{p}: not a UTF-8 text file (byte {e.start} is 0x{data[e.start]:02x}); is it the right file?"
        ) from None
