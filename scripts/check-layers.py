#!/usr/bin/env python3
"""Checks that imports between the crate's modules go one way only.

Reads every `crate::`, `super::`, `self::` and child-module path of each file under src/
(`use` lines and paths in code alike), resolves it to the file that defines it, and fails on:
  - an import from one floor to a floor it may not use (the arrows below), and
  - any loop between files.

    lib -> commands -> {parse, core, runtime, ffi}
    parse -> {core, runtime}
    runtime -> {store, core, ffi}
    store -> core
    ffi -> core

Usage: scripts/check-layers.py [src-dir]
"""

import os
import re
import sys

ALLOWED = {
    "lib": {"commands", "parse", "runtime", "store", "ffi", "core"},
    "commands": {"parse", "core", "runtime", "ffi"},
    "parse": {"core", "runtime"},
    "runtime": {"store", "core", "ffi"},
    "store": {"core"},
    "ffi": {"core"},
    "core": set(),
}


def module_files(src):
    """Maps a module path (tuple of names) to its file."""
    files = {}
    for root, _, names in os.walk(src):
        for name in names:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel == ["lib"]:
                files[()] = path
            elif rel[-1] == "mod":
                files[tuple(rel[:-1])] = path
            else:
                files[tuple(rel)] = path
    return files


def strip_comments_and_strings(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    # Unit tests sit in inline `#[cfg(test)] mod x { ... }` blocks: not part of the house.
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
        if not m:
            return text
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[: m.start()] + text[i:]


def expand(path):
    """Expands one brace group level by level: a::{b, c::{d}} -> a::b, a::c::d."""
    path = re.sub(r"\s+", "", path)
    m = re.search(r"\{", path)
    if not m:
        return [path]
    head = path[: m.start()]
    depth, parts, cur = 0, [], ""
    i = m.start() + 1
    while i < len(path):
        ch = path[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    out = []
    for part in parts:
        if part:
            out.extend(expand(head + part))
    return out


def references(text, here, children):
    """The module paths (tuples) this file names, resolved to absolute paths."""
    text = strip_comments_and_strings(text)
    raw = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        raw.extend(expand(m.group(1)))
    for m in re.finditer(r"(?<![\w:$])((?:crate|super|self|\$crate)(?:::\w+)+)", text):
        raw.append(m.group(1))
    for m in re.finditer(r"(?<![\w:$])(\w+)::\w+", text):
        if m.group(1) in children:
            raw.append(m.group(0))
    out = []
    for path in raw:
        path = path.split(" as ")[0]
        parts = [p for p in path.split("::") if p and p != "*"]
        if not parts:
            continue
        if parts[0] in ("crate", "$crate"):
            resolved = parts[1:]
        elif parts[0] == "super":
            base = list(here)
            while parts and parts[0] == "super":
                base = base[:-1]
                parts = parts[1:]
            resolved = base + parts
        elif parts[0] == "self":
            resolved = list(here) + parts[1:]
        elif parts[0] in children:
            resolved = list(here) + parts
        else:
            continue
        out.append(tuple(resolved))
    return out


def owner(path, files):
    """The file defining the longest module prefix of `path`."""
    for n in range(len(path), -1, -1):
        if path[:n] in files:
            return path[:n]
    return ()


def floor(module):
    return module[0] if module else "lib"


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "src"
    files = module_files(src)
    edges = {m: set() for m in files}
    problems = []
    seen = set()
    for module, path in sorted(files.items()):
        children = {k[-1] for k in files if len(k) == len(module) + 1 and k[: len(module)] == module}
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for ref in references(text, module, children):
            target = owner(ref, files)
            if target == module:
                continue
            edges[module].add(target)
            a, b = floor(module), floor(target)
            if a != b and b not in ALLOWED.get(a, set()) and (path, target) not in seen:
                seen.add((path, target))
                problems.append(f"{path}: {a} may not import {b} ({'::'.join(ref)})")
    # Loops between files (the crate root registers everything and is left out).
    graph = {m: {t for t in ts if t != ()} for m, ts in edges.items() if m != ()}
    index, low, stack, on, loops = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    for comp in loops:
        names = ", ".join(sorted(files[m] for m in comp))
        problems.append(f"import loop between: {names}")
    if problems:
        print("\n".join(problems))
        print(f"check-layers: {len(problems)} problem(s)")
        return 1
    print(f"check-layers: {len(files)} files, imports go one way, no loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
