"""HumanEval graded as the original grades it: the first fenced block, the prompt's leading
imports, and the sandbox's default 256 MB address-space limit."""

import json

from nanochat.sandbox import run_python
from nanochat.tasks.humaneval import HumanEval, extract_code, imports_of


def test_code_is_the_first_fenced_block_stripped():
    two = "A:\n```python\nx = 1\n```\nB:\n```python\nx = 2\n```"
    assert extract_code(two) == "x = 1"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    # Spaces after the opening fence are allowed; the block itself is stripped.
    assert extract_code("```python  \n    x = 1  \n```") == "x = 1"
    # No block: "py" is not "python", and a block must close on its own line. Then all, stripped.
    assert extract_code(" ```py\nx = 1\n```\n") == "```py\nx = 1\n```"
    assert extract_code("```python\nx = 1```") == "```python\nx = 1```"
    assert extract_code("\n  def f():\n    return 1\n") == "def f():\n    return 1"


def test_imports_are_the_prompts_leading_ones():
    prompt = (
        "import math\n# a helper below\n\n  from typing import List\n\n\ndef f(xs: List[int]) -> int:\n"
        '    import os\n    """Doc."""\n'
    )
    assert imports_of(prompt) == "import math\nfrom typing import List"
    assert imports_of("def f():\n    pass\nimport os\n") == ""


def test_the_first_block_is_graded_with_the_prompts_imports(tmp_path):
    row = {
        "task_id": "HumanEval/0",
        "prompt": "from typing import List\n\ndef total(xs: List[int]) -> int:\n",
        "canonical_solution": "    return sum(xs)\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
        "entry_point": "total",
    }
    folder = tmp_path / "tasks" / "openai/openai_humaneval" / "openai_humaneval"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text(json.dumps(row) + "\n")
    task = HumanEval(tmp_path, timeout=2)
    item = task[0]
    # `List` in the right answer is defined only by the prompt's import, which grading prepends.
    right = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    wrong = "```python\ndef total(xs):\n    return 0\n```"
    assert task.evaluate(item, f"{right}\nor\n{wrong}")
    assert not task.evaluate(item, f"{wrong}\nor\n{right}")


def test_sandbox_default_memory_limit_is_256_mb():
    assert "MemoryError" in run_python("x = bytearray(300 << 20)").stderr
    assert run_python("x = bytearray(100 << 20)").success
