"""Evaluation against the field's benchmarks, one module per concern:

    prompts      the prompt files of GenEval, DPG-Bench and plain text, read and checked
    generation   `vpit eval generation`: images in the benchmarks' folder layouts (their official scorers read them
                 unchanged), seeded, with a report of every prompt that got no image
    scores       CLIP score and a Fréchet distance in an open_clip encoder's feature space (torchmetrics)
    model_index  the figures of `vpit eval toy` / `vpit eval generation` as Hub `model-index` entries

This layer sits above inference (it drives `VPiTPipeline`); only the command line imports it.
"""
