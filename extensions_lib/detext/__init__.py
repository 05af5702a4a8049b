"""Find text in images (PP-OCR's DB detector through onnxruntime) and paint it out (OpenCV inpainting),
writing new files and pasting back only the masked pixels."""
