"""CapFilt: synthetic captions for web images, ranked against the original text (BLIP-2's data step).

  sources.read_sources(inputs)     webdataset shards, COCO/LAVIS json, JSONL or image folders -> groups of items
  job.capfilt(...)                 N sampled captions per image, scored with ITC (max over queries), top K kept
  output                           JSONL records or webdataset shards, both resumable and kill-safe
"""
