"""The architecture of ``bench/byom_mnist.py``'s model "trained elsewhere": a researcher's own file, as they write it.

It takes normalised MNIST pixels ((x - 0.1307) / 0.3081), as torchvision-style training loops feed it.
"""

import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28)) -> None:
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc2(self.act(self.fc1(x.flatten(1))))
