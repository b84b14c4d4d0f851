"""Finds the metric names a PromQL expression reads (a small tokenizer, no PromQL library).

    metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b"}[5m])))') == {"x_bucket"}

Skipped: functions and aggregations (an identifier followed by "(", or an aggregation followed by
by/without), keywords and set operators,
label names inside {...} and in by/without/on/ignoring/group_left/group_right lists, strings,
numbers and durations, and Grafana variables ($var, ${var}, [[var]]). A {__name__="x"} matcher
counts as the name x. Grafana's templating helpers are understood by ``grafana_query_names``.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$[A-Za-z0-9_]+|\[\[[A-Za-z0-9_:.]+\]\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^=<>(){}\[\],@!])
    """,
    re.VERBOSE,
)

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}
_LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                 "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            out.append((kind, m.group()))
        pos = m.end()
    return out


def metric_names(expr: str) -> set[str]:
    toks = tokens(expr)
    names: set[str] = set()
    stack: list[str] = []  # "(", "labels(", "{", "["
    label_list_next = False
    for i, (kind, text) in enumerate(toks):
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "op":
            if text == "(":
                stack.append("labels(" if label_list_next else "(")
                label_list_next = False
            elif text in "{[":
                stack.append(text)
            elif text in ")}]":
                if not stack:
                    raise ValueError(f"unbalanced {text!r} in {expr!r}")
                stack.pop()
            continue
        label_list_next = False
        if kind != "ident":
            continue
        inside = stack[-1] if stack else None
        if inside == "{":
            if text == "__name__" and nxt == "=" and i + 2 < len(toks) and toks[i + 2][0] == "string":
                names.add(toks[i + 2][1][1:-1])
            continue
        if inside in ("[", "labels("):
            continue
        low = text.lower()
        if low in KEYWORDS:
            label_list_next = low in _LABEL_LIST and nxt == "("
            continue
        if nxt == "(":
            continue  # function or aggregation
        if low in _AGGREGATIONS and nxt is not None and nxt.lower() in ("by", "without"):
            continue  # "sum by (le) (...)"
        names.add(text)
    if stack:
        raise ValueError(f"unbalanced brackets in {expr!r}")
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def grafana_query_names(query: str) -> set[str]:
    """Metric names of a Grafana Prometheus templating query."""
    m = _LABEL_VALUES.match(query)
    if m:
        return metric_names(m.group(1))
    m = _QUERY_RESULT.match(query)
    if m:
        return metric_names(m.group(1))
    if re.match(r"^\s*(label_names|metrics)\(", query) or re.match(r"^\s*label_values\(\s*\w+\s*\)\s*$", query):
        return set()
    return metric_names(query)
