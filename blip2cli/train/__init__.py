"""Training: `blip2 pretrain` and `blip2 finetune` over a recipe (config.Recipe).

    loop.py           run(recipe, out, resume, stop_after, on_log): setup -> fit; the Objective per task
    data.py           the recipe's data entries -> batches in a resumable order, per task's texts
    optim.py          AdamW parameter groups and learning-rate schedules
    checkpoint.py     step folders (loadable run dirs), resume, model.init
    feature_cache.py  frozen ViT outputs on disk, so later epochs skip the ViT

Nothing is imported here, so `import blip2cli.train` stays cheap.
"""
