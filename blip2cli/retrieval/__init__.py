"""Image retrieval: the embedding store (source of truth), the FAISS index built from it, ranking and indexing jobs.

`store` keeps files, content hashes and (Q, D) ITC query matrices; `index` chooses, builds and loads a FAISS index
over them; `rank` turns candidates into exactly scored hits; `indexer` is the incremental, interrupt-safe job;
`export` writes the clip-retrieval folder layout. Nothing here imports torch at module level.
"""
