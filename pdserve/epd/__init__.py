"""EPD: encode / prefill / decode disaggregation for multimodal (image + text) requests.

- `vlm.py`: what a vision-language model directory says (image token, tokens per image, processor).
- `images.py`: load an image (URL, file, data URI) with limits and preprocess it with PIL + numpy.
- `vision.py`: the vision tower + projector (runs on encode servers, or inside a unified engine).
- `mm.py`: multimodal inputs as they travel front -> engine and sit (opaque) on a Request.
- `front.py`: the HTTP front's part: placeholder expansion and where each request's embeddings come from.
- `messages.py`, `receiver.py`, `encode_server.py`: embeddings moving encoder -> language server through
  the KV transfer layer (pdserve/disagg/transfer.py); `buffers.py`: the range allocator of their buffers.
- `language.py`: the language-side engine that waits for embeddings (text mode, prefill
  --encoder-disaggregated).
- `dispatch.py`: the balancer-side function (mini_lb / router) that sends images to encode servers.
- `demo_vlm.py`: builds the demo VLM (SmolLM2-135M + an untrained, seeded CLIP-style vision tower).
"""
