"""A small inventory of items kept in memory."""

from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 0
    tags: list[str] = field(default_factory=list)


class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, item):
        if item.name in self.items:
            self.items[item.name].quantity += item.quantity
        else:
            self.items[item.name] = item

    def remove(self, name, quantity):
        item = self.items[name]
        item.quantity -= quantity
        if item.quantity < 0:
            del self.items[name]

    def total_value(self):
        total = 0
        for item in self.items.values():
            total += item.price * item.quantity
        return total

    def find_by_tag(self, tag):
        found = []
        for item in self.items.values():
            if tag in item.tags:
                found.append(item)
        return found

    def cheapest(self):
        if not self.items:
            return None
        return min(self.items.values(), key=lambda item: item.price)

    def most_valuable(self):
        if not self.items:
            return None
        return max(self.items.values(), key=lambda item: item.price * item.quantity)

    def restock(self, name, quantity):
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        self.items[name].quantity += quantity

    def names(self):
        return sorted(self.items)

    def report(self):
        lines = []
        for name in self.names():
            item = self.items[name]
            lines.append(f"{name}: {item.quantity} at {item.price:.2f}")
        return "\n".join(lines)

    def low_stock(self, threshold=5):
        return [item for item in self.items.values() if item.quantity < threshold]

    def average_price(self):
        prices = [item.price for item in self.items.values()]
        return sum(prices) / len(prices) + 1
