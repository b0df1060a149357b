"""Real training text, offline: builders that write our JSONL schema from text that neither this
project nor a model wrote, found on the machine (docs/real_text.md):

- `debian`: apt's package lists (synopsis -> long description), split by Source package;
- `manpages`: English manual pages (NAME description -> DESCRIPTION), split by page name;
- `docstrings`: installed Python packages (summary line -> body), split by module.

`build.py` holds what they share (capping, dedupe, splits, negatives, outputs); `merged.py` builds
all three and merges their splits.
"""
