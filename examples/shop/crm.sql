-- The CRM's customer table, as the shop's CRM keeps it. `knit demo` builds crm.db from
-- this file; by hand: sqlite3 crm.db < crm.sql
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    full_name TEXT NOT NULL,
    email TEXT,
    city TEXT,
    updated_at TEXT
);

INSERT INTO customers (id, full_name, email, city, updated_at) VALUES
    (1, 'Ada Lovelace', 'ada@example.org', 'London', '2024-05-01T09:00:00Z'),
    (2, 'Alan Turing', 'alan@example.org', 'Manchester', '2024-05-01T09:05:00Z'),
    (3, 'Grace Hopper', 'grace@example.org', 'New York', '2024-05-02T10:00:00Z'),
    (4, 'Edsger Dijkstra', 'edsger@example.org', 'Eindhoven', '2024-05-02T11:30:00Z'),
    (5, 'Barbara Liskov', 'barbara@example.org', 'Boston', '2024-05-03T08:15:00Z'),
    (6, 'Donald Knuth', 'don@example.org', 'Stanford', '2024-05-03T09:45:00Z'),
    (7, 'Margaret Hamilton', 'margaret@example.org', 'Cambridge', '2024-05-04T14:00:00Z'),
    (8, 'Ken Thompson', 'ken@example.org', 'Murray Hill', '2024-05-04T15:20:00Z'),
    (9, 'Frances Allen', 'fran@example.org', 'Yorktown', '2024-05-05T07:50:00Z'),
    (10, 'Niklaus Wirth', 'niklaus@example.org', 'Zurich', '2024-05-05T12:10:00Z'),
    (11, 'Radia Perlman', 'radia@example.org', 'Seattle', '2024-05-06T16:40:00Z'),
    (12, 'Leslie Lamport', 'leslie@example.org', 'Palo Alto', '2024-05-06T17:00:00Z'),
    (13, 'Sophie Wilson', 'sophie@example.org', 'Cambridge', '2024-05-07T09:30:00Z'),
    (14, 'Tony Hoare', 'tony@example.org', 'Oxford', '2024-05-07T10:10:00Z'),
    (15, 'Bjarne Stroustrup', 'bjarne@example.org', 'Aarhus', '2024-05-08T11:00:00Z'),
    (16, 'John McCarthy', 'john@example.org', 'Boston', '2024-05-08T13:25:00Z'),
    (17, 'Adele Goldberg', 'adele@example.org', 'Palo Alto', '2024-05-09T08:05:00Z'),
    (18, 'Dennis Ritchie', 'dennis@example.org', 'Murray Hill', '2024-05-09T09:55:00Z'),
    (19, 'Hedy Lamarr', 'hedy@example.org', 'Vienna', '2024-05-10T18:30:00Z'),
    (20, 'Jean Sammet', 'jean@example.org', 'Boston', '2024-05-10T19:00:00Z');
