"""Response-length prediction: features, LightGBM quantile models, serving and online learning."""
