"""The official InternVL2 quick start, running on internvl-runtime.

The snippets below are the model card's, with the import line changed from transformers/torchvision/
decord to ``internvl_runtime`` (the helpers build_transform, dynamic_preprocess, load_image and
load_video come from the package instead of being pasted in). Two more changes make it run anywhere:
the checkpoint, images and video are command-line arguments, and ``.cuda()`` becomes ``.to(device)``
so it also runs on a CPU-only machine.

    python examples/quick_start.py --model pretrained/InternVL2-1B --image1 a.jpg --image2 b.jpg --video clip.mp4

The model card's other loading snippets are behind flags (the default run is unchanged):
--load-in-8bit / --load-in-4bit (weight-only int8 / int4 LLM; run on CPU too, unlike the official
bitsandbytes path) and --split [NAME] (the "Multiple GPUs" snippet with split_model; skipped, with the
reason printed, on a machine without CUDA).
"""

import argparse
import os
from threading import Thread

import torch

from internvl_runtime import AutoModel, AutoTokenizer, TextIteratorStreamer, load_image, load_video
from internvl_runtime.placement import split_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="pretrained/InternVL2-1B", help="checkpoint folder")
parser.add_argument("--image1", default="./examples/image1.jpg")
parser.add_argument("--image2", default="./examples/image2.jpg")
parser.add_argument("--video", default="./examples/red-panda.mp4")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
parser.add_argument("--max-new-tokens", type=int, default=1024)
parser.add_argument("--load-in-8bit", action="store_true", help="the model card's 8-bit snippet")
parser.add_argument("--load-in-4bit", action="store_true", help="the model card's 4-bit snippet")
parser.add_argument("--split", nargs="?", const="", metavar="NAME",
                    help="the model card's multi-GPU snippet: split_model(NAME), NAME defaulting to the folder's name")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = getattr(torch, args.dtype)

# If you have an 80G A100 GPU, you can put the entire model on a single GPU.
# Otherwise, you need to load a model using multiple GPUs, please refer to the `Multiple GPUs` section.
path = args.model
if args.split is not None and not torch.cuda.is_available():
    print("Skipping the multi-GPU snippet (--split): split_model() spreads the layers over CUDA devices and this "
          "machine has none; loading on the CPU instead.")
    args.split = None
if args.load_in_8bit or args.load_in_4bit:
    # 8-bit / 4-bit quantization (the model card's snippets); the LLM's linear layers are quantized, the
    # vision encoder stays in 16-bit. On a GPU machine the model goes to the current GPU, as in transformers.
    model = AutoModel.from_pretrained(
        path,
        torch_dtype=dtype,
        load_in_8bit=args.load_in_8bit,
        load_in_4bit=args.load_in_4bit,
        low_cpu_mem_usage=True,
        use_flash_attn=True,
        trust_remote_code=True).eval()
elif args.split is not None:
    # Multiple GPUs: the first and last LLM layers, the vision encoder, the embeddings and the LM head share GPU 0.
    device_map = split_model(args.split or os.path.basename(os.path.normpath(path)))
    model = AutoModel.from_pretrained(
        path,
        torch_dtype=dtype,
        low_cpu_mem_usage=True,
        use_flash_attn=True,
        trust_remote_code=True,
        device_map=device_map).eval()
else:
    model = AutoModel.from_pretrained(
        path,
        torch_dtype=dtype,
        low_cpu_mem_usage=True,
        use_flash_attn=True,
        trust_remote_code=True).eval().to(device)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)

# set the max number of tiles in `max_num`
pixel_values = load_image(args.image1, max_num=12).to(dtype).to(device)
generation_config = dict(max_new_tokens=args.max_new_tokens, do_sample=True)

# pure-text conversation (纯文本对话)
question = 'Hello, who are you?'
response, history = model.chat(tokenizer, None, question, generation_config, history=None, return_history=True)
print(f'User: {question}\nAssistant: {response}')

question = 'Can you tell me a story?'
response, history = model.chat(tokenizer, None, question, generation_config, history=history, return_history=True)
print(f'User: {question}\nAssistant: {response}')

# single-image single-round conversation (单图单轮对话)
question = '<image>\nPlease describe the image shortly.'
response = model.chat(tokenizer, pixel_values, question, generation_config)
print(f'User: {question}\nAssistant: {response}')

# single-image multi-round conversation (单图多轮对话)
question = '<image>\nPlease describe the image in detail.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config, history=None, return_history=True)
print(f'User: {question}\nAssistant: {response}')

question = 'Please write a poem according to the image.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config, history=history, return_history=True)  # noqa: E501 - the model card's line
print(f'User: {question}\nAssistant: {response}')

# multi-image multi-round conversation, combined images (多图多轮对话，拼接图像)
pixel_values1 = load_image(args.image1, max_num=12).to(dtype).to(device)
pixel_values2 = load_image(args.image2, max_num=12).to(dtype).to(device)
pixel_values = torch.cat((pixel_values1, pixel_values2), dim=0)

question = '<image>\nDescribe the two images in detail.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               history=None, return_history=True)
print(f'User: {question}\nAssistant: {response}')

question = 'What are the similarities and differences between these two images.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               history=history, return_history=True)
print(f'User: {question}\nAssistant: {response}')

# multi-image multi-round conversation, separate images (多图多轮对话，独立图像)
pixel_values1 = load_image(args.image1, max_num=12).to(dtype).to(device)
pixel_values2 = load_image(args.image2, max_num=12).to(dtype).to(device)
pixel_values = torch.cat((pixel_values1, pixel_values2), dim=0)
num_patches_list = [pixel_values1.size(0), pixel_values2.size(0)]

question = 'Image-1: <image>\nImage-2: <image>\nDescribe the two images in detail.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list,
                               history=None, return_history=True)
print(f'User: {question}\nAssistant: {response}')

question = 'What are the similarities and differences between these two images.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list,
                               history=history, return_history=True)
print(f'User: {question}\nAssistant: {response}')

# batch inference, single image per sample (单图批处理)
pixel_values1 = load_image(args.image1, max_num=12).to(dtype).to(device)
pixel_values2 = load_image(args.image2, max_num=12).to(dtype).to(device)
num_patches_list = [pixel_values1.size(0), pixel_values2.size(0)]
pixel_values = torch.cat((pixel_values1, pixel_values2), dim=0)

questions = ['<image>\nDescribe the image in detail.'] * len(num_patches_list)
responses = model.batch_chat(tokenizer, pixel_values,
                             num_patches_list=num_patches_list,
                             questions=questions,
                             generation_config=generation_config)
for question, response in zip(questions, responses):  # noqa: B905 - the model card's line
    print(f'User: {question}\nAssistant: {response}')

# video multi-round conversation (视频多轮对话)
video_path = args.video
pixel_values, num_patches_list = load_video(video_path, num_segments=8, max_num=1)
pixel_values = pixel_values.to(dtype).to(device)
video_prefix = ''.join([f'Frame{i+1}: <image>\n' for i in range(len(num_patches_list))])
question = video_prefix + 'What is the red panda doing?'
# Frame1: <image>\nFrame2: <image>\n...\nFrame8: <image>\n{question}
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list, history=None, return_history=True)
print(f'User: {question}\nAssistant: {response}')

question = 'Describe this video in detail. Don\'t repeat.'
response, history = model.chat(tokenizer, pixel_values, question, generation_config,
                               num_patches_list=num_patches_list, history=history, return_history=True)
print(f'User: {question}\nAssistant: {response}')

# streaming output
pixel_values = load_image(args.image1, max_num=12).to(dtype).to(device)
question = '<image>\nPlease describe the image shortly.'
# Initialize the streamer
streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=10)
# Define the generation configuration
generation_config = dict(max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
# Start the model chat in a separate thread
thread = Thread(target=model.chat, kwargs=dict(
    tokenizer=tokenizer, pixel_values=pixel_values, question=question,
    history=None, return_history=False, generation_config=generation_config,
))
thread.start()

# Initialize an empty string to store the generated text
generated_text = ''
# Loop through the streamer to get the new text as it is generated
for new_text in streamer:
    if new_text == model.conv_template.sep:
        break
    generated_text += new_text
    print(new_text, end='', flush=True)  # Print each new text fragment as it is generated
thread.join()
print()
