"""The README's pass example is real code: extract it, run it, check its effect."""

from __future__ import annotations

import re
from pathlib import Path

from irtool import registry
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import parse_pipeline
from tests.test_passmanager import small_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pass_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "@register_pass" in b)
    exec(compile(example, "README.md", "exec"), {})
    assert "prefix-names" in registry.pass_names()
    model = small_model()
    records = PassManager(parse_pipeline("prefix-names{prefix=a/}").build(), verify_each=True).run(
        model, PassContext())
    assert [n.name for n in model.graph.nodes] == ["a/mm", "a/relu", "a/dead"]
    assert records[0].stats == {"renamed": 3}
