"""Hand mutants of the cache key's two defences, ctprofd/resolve/attach.py learned_key and
ctprofd/resolve/layout.py applies_to (scripts/hand_mutants.py; scores in docs/testing.md)."""

MUTANTS = [
    ("key without the owner", "ctprofd/resolve/attach.py",
     '    return f"build-id:{build_id}:uid:{owner}"',
     '    return f"build-id:{build_id}:uid:0"'),
    ("no placement check", "ctprofd/resolve/attach.py",
     "            if isinstance(found, TsdLayout) and applies_to(found, facts):",
     "            if isinstance(found, TsdLayout):"),
    ("placement not compared", "ctprofd/resolve/layout.py",
     "            and {name: getattr(layout, name) for name in facts.placement()} == facts.placement()",
     "            and True"),
    ("symbol not compared", "ctprofd/resolve/layout.py",
     "            and (facts.symbol is None\n",
     "            and (True\n"),
]
