"""The GPU check's summary table (printed after each part and written beside the JSON)."""

from __future__ import annotations


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return format(v, ".4g")


def format_rows(rows: list[dict]) -> str:
    head = f"{'check / figure':<92} {'value':>16} {'unit':<12} {'baseline':>10} {'ratio':>7}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = "" if "ok" not in r else ("ok" if r["ok"] else "FAIL")
        if "tolerance" in r:
            ok += f" (tol {r['tolerance']:.2g})"
        if r.get("target_text") and r.get("target_met") is not None:
            ok += f" target {r['target_text']}: {'met' if r['target_met'] else 'NOT met'}"
        base, ratio = r.get("baseline"), r.get("ratio")
        lines.append(f"{r['name'][:92]:<92} {_fmt(r['value'])[:16]:>16} {r['unit']:<12} "
                     f"{'' if base is None else _fmt(base):>10} "
                     f"{'' if ratio is None else format(ratio, '.2f'):>7}  {ok}")
        if r.get("error"):
            lines.append(f"    {str(r['error'])[:300]}")
    return "\n".join(lines)


def summary(doc: dict) -> str:
    """The whole table, part by part, with each part's status and seconds."""
    out = [f"dist-lm GPU check ({'CPU rehearsal' if doc['dry'] else 'GPU'}): "
           f"{doc['seconds']:.0f} s, complete: {doc['complete']}, "
           f"{len(doc['failed'])} failed check(s)"]
    for part, st in doc["parts"].items():
        rows = [r for r in doc["results"] if r.get("part") == part]
        out += ["", f"== {part}: {st['status']} ({st['seconds']:.1f} s of {st['bound_s']:.0f})",
                format_rows(rows)]
    return "\n".join(out) + "\n"
