"""Where training images and prompts come from: captioned folders, named image sets, prompt lists."""
