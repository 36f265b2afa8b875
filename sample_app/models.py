"""The one model: a froggy."""

from __future__ import annotations

import typing as t

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import Base

NAME_MAX = 80
COLOUR_MAX = 32
JUMP_HEIGHT_MAX = 32


class Froggy(Base):
    __tablename__ = "froggy"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Unique, so a batch that creates a duplicate fails at its commit.
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    colour: Mapped[str] = mapped_column(String(COLOUR_MAX))
    is_jumping: Mapped[bool] = mapped_column(default=False)
    jump_height: Mapped[str | None] = mapped_column(String(JUMP_HEIGHT_MAX))

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "id": self.id,
            "name": self.name,
            "colour": self.colour,
            "is_jumping": self.is_jumping,
            "jump_height": self.jump_height,
        }
