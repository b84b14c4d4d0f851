"""Attribution maps to what a client receives: PNG heatmaps, overlays, float16 arrays, JSON."""
