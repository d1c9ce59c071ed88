"""Data: image loading, input expansion, transforms, text cleaning, datasets. Values in, values out."""
