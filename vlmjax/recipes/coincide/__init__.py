"""COINCIDE (Lee, Li, Hwang 2024): pick a training subset by clusters of a small reference VLM's features.

    features.capture / build_features  -> unit-norm (N, 2LD) fp16 vectors (features.py)
    kmeans.spherical_kmeans            -> K centroids + assignment (kmeans.py; JAX, faiss-cpu optional)
    select.select_clusters / baselines -> selection.json + the subset file (select.py)
CLI: python -m vlmjax.recipes.coincide {features,kmeans,select} (see __main__.py). Spec: shared/recipes/coincide.md.
"""
