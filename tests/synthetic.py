"""Click logs with a known structure: each user mixes two of several item clusters."""

import numpy as np


def planted_clusters(path, n_users=800, n_clusters=20, per_cluster=20, clicks=30, seed=0):
    """Write ``user,item,timestamp``; items of one cluster are equally popular, so the
    most-popular baseline is near chance while a multi-interest model can find the clusters."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("user,item,timestamp\n")
        for u in range(n_users):
            mine = rng.choice(n_clusters, size=2, replace=False)
            for t in range(clicks):
                c = mine[rng.integers(2)]
                item = 1000 + c * per_cluster + rng.integers(per_cluster)
                f.write(f"{u},{item},{t}\n")
    return path
