"""How the demo sample in this folder was cut (kept for reproducibility; needs ../shared).

From amazon-book-1m: the 2,000 most clicked books, the users with >= 8 clicks on them,
2,500 of those users drawn with a fixed seed; their clicks on those books, and the titles.
    python models/mind/data/make_demo_sample.py ../shared/datasets
"""

import csv
import gzip
import os
import sys
from collections import Counter

import numpy as np

src = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets"
here = os.path.dirname(os.path.abspath(__file__))
with gzip.open(os.path.join(src, "amazon-book-1m.csv.gz"), "rt") as f:
    rows = list(csv.reader(f))[1:]
popular = {i for i, _ in Counter(r[1] for r in rows).most_common(2000)}
rows = [r for r in rows if r[1] in popular]
per_user = Counter(r[0] for r in rows)
users = sorted((u for u, c in per_user.items() if c >= 8), key=int)
chosen = set(np.random.default_rng(7).choice(users, size=2500, replace=False).tolist())
rows = [r for r in rows if r[0] in chosen]
with gzip.GzipFile(os.path.join(here, "demo_clicks.csv.gz"), "wb", mtime=0) as g:
    g.write(("user,item,timestamp\n" + "".join(",".join(r) + "\n" for r in rows)).encode())
items = {r[1] for r in rows}
with gzip.open(os.path.join(src, "amazon-book-1m.titles.csv.gz"), "rt") as f:
    titles = [t for t in csv.reader(f)][1:]
out = [t for t in titles if t[0] in items]
with gzip.GzipFile(os.path.join(here, "demo_titles.csv.gz"), "wb", mtime=0) as g:
    text = "item,title\n" + "".join(f'{t[0]},"{t[1].replace(chr(34), chr(39))}"\n' for t in out)
    g.write(text.encode())
print(f"{len(rows)} clicks, {len(chosen)} users, {len(items)} items")
