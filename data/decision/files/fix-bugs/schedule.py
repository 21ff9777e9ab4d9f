"""Meetings in one day, as (start, end) minutes since midnight."""


def parse(time_text):
    hours, minutes = time_text.split(":")
    return int(hours) * 60 + int(minutes)


def format_time(minutes):
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class Day:
    def __init__(self):
        self.meetings = []

    def add(self, start, end, title):
        if end < start:
            raise ValueError("a meeting cannot end before it starts")
        self.meetings.append((parse(start), parse(end), title))
        self.meetings.sort()

    def busy_minutes(self):
        total = 0
        for start, end, _ in self.meetings:
            total += end - start
        return total

    def titles(self):
        return [title for _, _, title in self.meetings]

    def first(self):
        if not self.meetings:
            return None
        return self.meetings[0]

    def last(self):
        if not self.meetings:
            return None
        return self.meetings[-1]

    def at(self, time_text):
        moment = parse(time_text)
        for start, end, title in self.meetings:
            if start <= moment < end:
                return title
        return None

    def overlaps(self):
        found = []
        for (s1, e1, t1), (s2, e2, t2) in zip(self.meetings, self.meetings[1:]):
            if s2 < e1:
                found.append((t1, t2))
        return found

    def remove(self, title):
        self.meetings = [m for m in self.meetings if m[2] != title]

    def longest(self):
        if not self.meetings:
            return None
        return max(self.meetings, key=lambda m: m[1] - m[0])

    def agenda(self):
        lines = []
        for start, end, title in self.meetings:
            lines.append(f"{format_time(start)}-{format_time(end)} {title}")
        return "\n".join(lines)

    def free_slots(self, day_start="09:00", day_end="17:00"):
        slots = []
        cursor = parse(day_start)
        for start, end, _ in self.meetings:
            if start > cursor:
                slots.append((format_time(cursor), format_time(start)))
            cursor = max(cursor, end)
        if cursor < parse(day_end):
            slots.append((format_time(cursor), format_time(day_end)))
        return slots
