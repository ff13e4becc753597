"""Inference on the model core: KV-cached text-and-image generation, the model + processor + decoder pipeline, and
the terminal chat and the web app.

    generation  generate(model, ...): text and K-step visual decoding in one batched loop
    pipeline    VPiTPipeline: prompts and images in, text and decoded images out
    chat        `vpit chat`: a terminal conversation on a VPiTPipeline
    app         `vpit app`: the same conversation in a Gradio web app (needs `vpit[app]`)
"""
