"""Regenerate the README's table of recipe keys from the schemas (`keel config keys --markdown`).
tests/test_cli_reference.py fails when the README and the schemas disagree; run this to mend it."""
import re
from pathlib import Path

from keel.cli.config import all_keys, keys_table

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- keys:start -->\n).*?(<!-- keys:end -->)", re.S)


def readme_with_keys(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + keys_table(all_keys()) + "\n" + m.group(2), text)


if __name__ == "__main__":
    README.write_text(readme_with_keys(README.read_text()))
    print(f"updated {README}")
